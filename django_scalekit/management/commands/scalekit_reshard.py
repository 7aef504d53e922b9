"""``manage.py scalekit_reshard``: plan or apply a new bucket map for a shard group.

``--plan NEW_MAP`` prints which buckets move from which database to which and
how many rows each carries, changing nothing. ``--apply [NEW_MAP]`` moves the
rows in batches (see ``django_scalekit.sharding.apply_reshard``); without a
map it uses the group's MAP in settings, which moves any rows left on a
database their bucket no longer maps to. ``--apply NEW_MAP --keep-source``
copies without deleting; after the new MAP is deployed, ``--cleanup`` deletes
the old copies that are identical to the new ones. NEW_MAP is JSON, inline or
``@path/to/file.json``: ``{"0-340": "shard0", "341-511": "shard2", ...}``.

Once the deployed MAP sends a bucket to its new database, that copy is the
live one: ``--apply`` then copies nothing and reports old rows with no copy
there (exit non-zero) unless ``--copy-missing``, and ``--cleanup
--discard-stale`` deletes old copies that differ from the live ones.
``--retired ALIAS`` adds a database no map names any more to the scan.

``--apply`` and ``--cleanup`` show the plan and, at a terminal, ask for
confirmation unless ``--noinput``; unattended (stdin not a terminal: a
script, ``call_command()``) they go ahead after printing it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from django.conf import settings
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
    help = (
        "Plan (--plan NEW_MAP), apply (--apply [NEW_MAP] [--keep-source]) or clean "
        "up after (--cleanup) a new bucket map of a shard group."
    )

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
        action.add_argument(
            "--cleanup",
            action="store_true",
            help="After --apply --keep-source and the deploy of the new MAP: delete rows "
            "on a database the MAP in settings no longer sends their bucket to, when an "
            "identical copy is on the bucket's database; report the others.",
        )
        parser.add_argument(
            "--keep-source",
            action="store_true",
            help="With --apply: copy and verify, delete nothing (then deploy, then --cleanup).",
        )
        parser.add_argument(
            "--copy-missing",
            action="store_true",
            help="With --apply, for buckets the MAP in settings already sends to their new "
            "database: copy old rows that have no copy there (default: report them; they "
            "may have been deleted there since). Use it when you know writes went to the "
            "old database after the copy.",
        )
        parser.add_argument(
            "--discard-stale",
            action="store_true",
            help="With --cleanup: also delete old copies that differ from the copy on "
            "their bucket's database (the live one). Check the report of a run without "
            "it first.",
        )
        parser.add_argument(
            "--retired",
            action="append",
            default=[],
            metavar="ALIAS",
            help="Also scan this database (repeatable): one that no map names any more "
            "but may still hold rows of the group, e.g. after deploying a MAP that drops "
            "it while SHARDS is not set.",
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
        parser.add_argument(
            "--noinput",
            "--no-input",
            action="store_false",
            dest="interactive",
            help="Do not ask for confirmation (needed when stdin is not a terminal).",
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
        if options["keep_source"] and options["apply"] is None:
            raise CommandError("--keep-source goes with --apply NEW_MAP.")
        if options["copy_missing"] and options["apply"] is None:
            raise CommandError("--copy-missing goes with --apply.")
        if options["discard_stale"] and not options["cleanup"]:
            raise CommandError("--discard-stale goes with --cleanup.")
        retired = options["retired"]
        unknown = [alias for alias in retired if alias not in settings.DATABASES]
        if unknown:
            raise CommandError(f"--retired {unknown[0]!r} is not in DATABASES.")
        batch = options["batch_size"]
        if batch is not None and batch < 1:
            raise CommandError("--batch-size must be >= 1")
        if options["cleanup"]:
            self._cleanup(
                name,
                group,
                batch,
                options["interactive"],
                discard_stale=options["discard_stale"],
                retired=retired,
            )
            return
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

        moves = sharding.plan_reshard(name, new_map, retired=retired)
        if options["apply"] is not None and not raw:
            self.stdout.write(
                "No NEW_MAP given: moving rows to where the MAP in settings puts their "
                "bucket. (Is the new MAP deployed? If not, this moves rows back.)"
            )
        self._print_plan(name, group, moves)
        if options["plan"] is not None:
            self.stdout.write("Plan only: nothing was changed.")
            return
        if not any(m.total for m in moves):
            self.stdout.write("No rows to move.")
            return
        keep = options["keep_source"]
        self._confirm(
            options["interactive"],
            "copy these rows (nothing is deleted)"
            if keep
            else "move these rows (copied, verified, then deleted from the old database)",
        )
        try:
            result = sharding.apply_reshard(
                name,
                new_map,
                batch_size=batch,
                progress=lambda line: self.stdout.write(line),
                keep_source=keep,
                copy_missing=options["copy_missing"],
                retired=retired,
            )
        except KeyboardInterrupt:
            raise CommandError(
                "Interrupted. Every row is on its old database, or verified on its new "
                "one (and on the old one too if its batch had not committed): it is safe "
                "to run the same command again to finish.",
                returncode=130,
            ) from None
        except sharding.ReshardLocked as exc:
            raise CommandError(str(exc)) from exc
        except (sharding.ShardingError, DatabaseError) as exc:
            raise CommandError(
                f"Resharding stopped: {exc}. Every row is still on its old database or "
                "safely copied; run the same command again to finish."
            ) from exc
        rate = result.rows / result.seconds if result.seconds else 0.0
        done = "Copied" if keep else "Moved"
        detail = ", ".join(
            f"{label} {n}" for label, n in sorted(result.by_model.items())
        )
        self.stdout.write(
            self.style.SUCCESS(
                f"{done} {result.rows} rows ({detail}) in {result.batches} batches, "
                f"{result.seconds:.1f} s ({rate:.0f} rows/s); every "
                f"{done.lower()} row verified on its new database."
            )
        )
        self._report_conflicts(result)
        if tuple(new_map) != group.alias_by_bucket:
            then = (
                "then run `manage.py scalekit_reshard --cleanup` to delete the old copies."
                if keep
                else "then run `manage.py scalekit_reshard --apply` once more to move rows "
                "written to the old databases in between."
            )
            self.stdout.write(
                f'Now set SCALEKIT["SHARDING"]["GROUPS"][{name!r}]["MAP"] to the new map and '
                f"deploy, {then}"
            )
            dropped = [a for a in group.alias_by_bucket if a not in new_map]
            if dropped:
                names = ", ".join(dict.fromkeys(dropped))
                self.stdout.write(
                    f"The new map gives no buckets to {names}: keep it in SHARDS until "
                    f"then, or pass --retired {dropped[0]} to those runs, or rows left "
                    "there are not found."
                )

    def _cleanup(
        self,
        name: str,
        group: conf.ShardGroup,
        batch: int | None,
        interactive: bool,
        *,
        discard_stale: bool,
        retired: list[str],
    ) -> None:
        moves = sharding.plan_reshard(name, group.alias_by_bucket, retired=retired)
        total = sum(m.total for m in moves)
        self.stdout.write(
            f"Shard group {name!r}: {total} rows are on a database the MAP in settings "
            "does not send their bucket to."
        )
        for buckets, run in _ranges(moves):
            self.stdout.write(
                f"  buckets {buckets}: on {run[0].source}, belong on {run[0].target}: "
                f"{sum(m.total for m in run)} rows"
            )
        if not total:
            self.stdout.write("Nothing to clean up.")
            return
        self._confirm(
            interactive,
            "delete each of these rows that has a copy on its bucket's database"
            if discard_stale
            else "delete each of these rows whose identical copy is on its bucket's "
            "database",
        )
        try:
            result = sharding.cleanup_reshard(
                name,
                batch_size=batch,
                progress=lambda line: self.stdout.write(line),
                discard_stale=discard_stale,
                retired=retired,
            )
        except KeyboardInterrupt:
            raise CommandError(
                "Interrupted. Only rows with an identical copy on their bucket's database "
                "were deleted: it is safe to run the same command again.",
                returncode=130,
            ) from None
        except sharding.ReshardLocked as exc:
            raise CommandError(str(exc)) from exc
        except (sharding.ShardingError, DatabaseError) as exc:
            raise CommandError(f"Cleanup stopped: {exc}. Run it again.") from exc
        self.stdout.write(
            self.style.SUCCESS(
                f"Deleted {result.rows} old copies in {result.batches} batches, "
                f"{result.seconds:.1f} s."
            )
        )
        self._report_conflicts(result)

    def _report_conflicts(self, result: sharding.ReshardResult) -> None:
        if not result.conflicts:
            return
        lines = ["Old copies left in place on the old database:"]
        for label, n in sorted(result.differ.items()):
            lines.append(
                f"  {n} {label} rows differ from their copy on the database the MAP in "
                "settings sends their bucket to. That copy is the live one and was kept "
                "(usually updated there since the deploy; or written on the old database "
                "after the copy). Once checked, `--cleanup --discard-stale` deletes the "
                "old copies."
            )
        for label, n in sorted(result.missing.items()):
            lines.append(
                f"  {n} {label} rows have no copy on the database the MAP in settings "
                "sends their bucket to: deleted there since the deploy, or written on the "
                "old database after the copy. Delete the old rows by hand, or, if they "
                "are writes the new database missed, `--apply --copy-missing` copies them."
            )
        lines.append("E.g.: " + "; ".join(result.examples))
        raise CommandError("\n".join(lines))

    def _confirm(self, interactive: bool, what: str) -> None:
        if not interactive:
            return
        if not sys.stdin.isatty():
            # A script, a CI job or call_command(): nobody to ask, and waiting
            # for an answer would hang it.
            self.stdout.write(
                "stdin is not a terminal: going ahead without asking (plan above)."
            )
            return
        answer = input(f"About to {what}. Type 'yes' to continue: ")
        if answer.strip().lower() != "yes":
            raise CommandError("Cancelled: nothing was changed.")

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
