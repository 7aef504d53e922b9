"""``manage.py scalekit_reshard``: plan or apply a new bucket map for a shard group.

``--plan NEW_MAP`` prints which buckets move from which database to which and
how many rows each carries, changing nothing. ``--apply [NEW_MAP]`` moves the
rows in batches (see ``django_scalekit.sharding.apply_reshard``); without a
map it uses the group's MAP in settings, which moves any rows left on a
database their bucket no longer maps to. NEW_MAP is JSON, inline or
``@path/to/file.json``: ``{"0-340": "shard0", "341-511": "shard2", ...}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from django_scalekit import conf, sharding


def _ranges(
    moves: list[sharding.BucketMove],
) -> list[tuple[str, list[sharding.BucketMove]]]:
    """Group consecutive buckets moving between the same two databases."""
    runs: list[list[sharding.BucketMove]] = []
    for move in moves:
        last = runs[-1][-1] if runs else None
        if (
            last is not None
            and (last.source, last.target) == (move.source, move.target)
            and last.bucket == move.bucket - 1
        ):
            runs[-1].append(move)
        else:
            runs.append([move])
    return [
        (
            f"{run[0].bucket}-{run[-1].bucket}" if len(run) > 1 else str(run[0].bucket),
            run,
        )
        for run in runs
    ]


class Command(BaseCommand):
    help = "Plan (--plan NEW_MAP) or apply (--apply [NEW_MAP]) a new bucket map of a shard group."

    def add_arguments(self, parser: CommandParser) -> None:
        action = parser.add_mutually_exclusive_group(required=True)
        action.add_argument(
            "--plan",
            metavar="NEW_MAP",
            help='Print the moves NEW_MAP implies (JSON or @file), e.g. \'{"0-511": "shard0", ...}\'.',
        )
        action.add_argument(
            "--apply",
            metavar="NEW_MAP",
            nargs="?",
            const="",
            help="Move rows to where NEW_MAP (default: the MAP in settings) puts their bucket.",
        )
        parser.add_argument(
            "--group",
            help="Shard group (needed when SCALEKIT['SHARDING'] has several).",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            help="Rows per batch (default RESHARD_BATCH_SIZE).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        groups = conf.get().sharding.groups
        name = options["group"]
        if name is None:
            if len(groups) != 1:
                raise CommandError(
                    "Name the shard group with --group: one of "
                    + ", ".join(map(repr, groups))
                    if groups
                    else 'SCALEKIT["SHARDING"]["GROUPS"] is empty: nothing to reshard.'
                )
            (name,) = groups
        elif name not in groups:
            raise CommandError(
                f"--group {name!r} is not in SCALEKIT['SHARDING']['GROUPS']."
            )
        group = groups[name]
        raw = options["plan"] if options["plan"] is not None else options["apply"]
        if raw:
            if raw.startswith("@"):
                try:
                    raw = Path(raw[1:]).read_text()
                except OSError as exc:
                    raise CommandError(f"Cannot read the new map: {exc}") from exc
            try:
                new_map = sharding.parse_map(name, raw)
            except ValueError as exc:
                raise CommandError(f"Invalid new map: {exc}") from exc
        else:
            new_map = group.alias_by_bucket
        batch = options["batch_size"]
        if batch is not None and batch < 1:
            raise CommandError("--batch-size must be >= 1")

        moves = sharding.plan_reshard(name, new_map)
        self._print_plan(name, group, moves)
        if options["plan"] is not None:
            self.stdout.write("Plan only: nothing was changed.")
            return
        if not any(m.total for m in moves):
            self.stdout.write("No rows to move.")
            return
        try:
            result = sharding.apply_reshard(
                name,
                new_map,
                batch_size=batch,
                progress=lambda line: self.stdout.write(line),
            )
        except (sharding.ShardingError, DatabaseError) as exc:
            raise CommandError(
                f"Resharding stopped: {exc}. Every row is still on its old database or "
                "safely copied; run the same command again to finish."
            ) from exc
        rate = result.rows / result.seconds if result.seconds else 0.0
        self.stdout.write(
            self.style.SUCCESS(
                f"Moved {result.rows} rows in {result.batches} batches, {result.seconds:.1f} s "
                f"({rate:.0f} rows/s); every moved row verified on its new database."
            )
        )
        if tuple(new_map) != group.alias_by_bucket:
            self.stdout.write(
                f'Now set SCALEKIT["SHARDING"]["GROUPS"][{name!r}]["MAP"] to the new map and '
                "deploy, then run `manage.py scalekit_reshard --apply` once more to move rows "
                "written to the old databases in between."
            )

    def _print_plan(
        self, name: str, group: conf.ShardGroup, moves: list[sharding.BucketMove]
    ) -> None:
        changed = sum(1 for m in moves if group.alias_by_bucket[m.bucket] != m.target)
        total = sum(m.total for m in moves)
        self.stdout.write(
            f"Shard group {name!r}: {changed} of {group.buckets} buckets change database; "
            f"{total} rows move."
        )
        for buckets, run in _ranges(moves):
            rows: dict[str, int] = {}
            for move in run:
                for label, n in move.rows.items():
                    rows[label] = rows.get(label, 0) + n
            detail = ", ".join(f"{label} {n}" for label, n in sorted(rows.items()))
            self.stdout.write(
                f"  buckets {buckets}: {run[0].source} -> {run[0].target}: "
                f"{sum(rows.values())} rows" + (f" ({detail})" if detail else "")
            )
