from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from django_scalekit import conf


def ids(settings_value):
    return [p.id for p in conf.build(settings_value).problems]


def test_defaults():
    built = conf.build({})
    assert built.primary == "default"
    assert built.replicas == ()
    assert built.pinning_seconds == 5.0
    assert built.replica_retry_seconds == 15.0
    assert built.replica_max_lag_seconds is None
    assert built.problems == ()


def test_replica_list_gets_equal_weights():
    built = conf.build({"REPLICAS": ["replica", "replica_b"]})
    assert built.replicas == ("replica", "replica_b")
    assert built.default_group.weights == (1.0, 1.0)
    assert built.default_group.cum_weights == (1.0, 2.0)
    assert set(built.alias_groups) == {"default", "replica", "replica_b"}


def test_replica_mapping_keeps_weights():
    built = conf.build({"REPLICAS": {"replica": 3, "replica_b": 0.5}})
    assert built.default_group.weights == (3.0, 0.5)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({}, []),
        ([], ["scalekit.E001"]),
        ("nope", ["scalekit.E001"]),
        ({"PRIMARY": 3}, ["scalekit.E002"]),
        ({"PRIMARY": "missing"}, ["scalekit.E003"]),
        ({"REPLICAS": "replica"}, ["scalekit.E004"]),
        ({"REPLICAS": [None]}, ["scalekit.E004"]),
        ({"REPLICAS": ["replica2"]}, ["scalekit.E005"]),
        ({"REPLICAS": {"replica": 0}}, ["scalekit.E006"]),
        ({"REPLICAS": {"replica": -1}}, ["scalekit.E006"]),
        ({"REPLICAS": {"replica": "2"}}, ["scalekit.E006"]),
        ({"REPLICAS": {"replica": True}}, ["scalekit.E006"]),
        ({"REPLICAS": {"replica": float("nan")}}, ["scalekit.E006"]),
        ({"REPLICAS": ["default"]}, ["scalekit.E007"]),
        ({"REPLICAS": ["replica", "replica"]}, ["scalekit.E007"]),
        ({"PINNING_SECONDS": -1}, ["scalekit.E008"]),
        ({"PINNING_SECONDS": "5"}, ["scalekit.E008"]),
        ({"REPLICA_RETRY_SECONDS": 0}, ["scalekit.E009"]),
        ({"REPLICA_MAX_LAG_SECONDS": 0}, ["scalekit.E010"]),
        ({"REPLICA_MAX_LAG_SECONDS": None}, []),
        ({"REPLICA_LAG_CHECK_SECONDS": None}, ["scalekit.E011"]),
        ({"PINNING_COOKIE_NAME": "bad name"}, ["scalekit.E012"]),
        ({"PINNING_COOKIE_SECURE": "yes"}, ["scalekit.E012"]),
        ({"CACHE": []}, ["scalekit.E013"]),
        ({"REPLICAS_": ["replica"]}, ["scalekit.W001"]),
        ({"READ_YOUR_WRITES": "lsn"}, []),
        ({"READ_YOUR_WRITES": "causal"}, ["scalekit.E018"]),
        ({"LSN_CHECK_SECONDS": 0}, ["scalekit.E019"]),
        ({"RETRY_ON_REPLICA_FAILURE": "yes"}, ["scalekit.E020"]),
    ],
)
def test_problems(value, expected):
    assert ids(value) == expected


def test_every_problem_names_the_key():
    problems = conf.build({"REPLICAS": {"replica2": 1}, "PINNING_SECONDS": -1}).problems
    assert 'SCALEKIT["REPLICAS"]' in problems[0].msg and "'replica2'" in problems[0].msg
    assert 'SCALEKIT["PINNING_SECONDS"]' in problems[1].msg
    assert all(p.hint for p in problems)


def test_get_raises_improperly_configured_with_the_check_id():
    with (
        override_settings(SCALEKIT={"REPLICAS": ["nope"]}),
        pytest.raises(ImproperlyConfigured, match=r"scalekit\.E005"),
    ):
        conf.get()


def test_get_is_cached_and_cleared_by_override_settings():
    first = conf.get()
    assert conf.get() is first
    with override_settings(SCALEKIT={"REPLICAS": ["replica_b"]}):
        assert conf.get().replicas == ("replica_b",)
    assert conf.get().replicas == ("replica",)


def test_pinning_cookie_secure_follows_session_cookie_secure():
    with override_settings(SESSION_COOKIE_SECURE=True):
        assert conf.get().pinning_cookie_secure is True
    with override_settings(
        SESSION_COOKIE_SECURE=True, SCALEKIT={"PINNING_COOKIE_SECURE": False}
    ):
        assert conf.get().pinning_cookie_secure is False


def test_missing_scalekit_setting_means_defaults():
    with override_settings():
        from django.conf import settings

        del settings.SCALEKIT
        conf.clear()  # deleting a setting sends no setting_changed
        try:
            assert conf.get().replicas == ()
        finally:
            conf.clear()


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        (
            {
                "a": {
                    "PRIMARY": "analytics",
                    "REPLICAS": ["analytics_replica"],
                    "APPS": ["x"],
                }
            },
            [],
        ),
        ([], ["scalekit.E014"]),
        ({"default": {"PRIMARY": "analytics"}}, ["scalekit.E014"]),
        ({"a": {"PRIMARY": "nope"}}, ["scalekit.E015"]),
        ({"a": {"PRIMARY": "analytics", "REPLICAS": ["ghost"]}}, ["scalekit.E005"]),
        ({"a": {"PRIMARY": "replica"}}, ["scalekit.E016"]),
        (
            {"a": {"PRIMARY": "analytics"}, "b": {"PRIMARY": "analytics"}},
            ["scalekit.E016"],
        ),
        ({"a": {"PRIMARY": "analytics", "MODELS": ["Event"]}}, ["scalekit.E017"]),
        (
            {
                "a": {"PRIMARY": "analytics", "APPS": ["x"]},
                "b": {"PRIMARY": "replica_b", "APPS": ["x"]},
            },
            ["scalekit.E017"],
        ),
        ({"a": {"PRIMARY": "analytics", "WHAT": 1}}, ["scalekit.W001"]),
    ],
)
def test_group_problems(groups, expected):
    assert ids({"REPLICAS": ["replica"], "GROUPS": groups}) == expected


def test_groups_are_built_with_lookup_tables():
    built = conf.build(
        {
            "REPLICAS": ["replica"],
            "GROUPS": {
                "a": {
                    "PRIMARY": "analytics",
                    "REPLICAS": {"analytics_replica": 2},
                    "APPS": ["Reports"],
                    "MODELS": ["shop.Event"],
                }
            },
        }
    )
    group = built.groups["a"]
    assert (group.primary, group.replicas, group.weights) == (
        "analytics",
        ("analytics_replica",),
        (2.0,),
    )
    assert built.app_groups == {"reports": group}
    assert built.model_groups == {"shop.event": group}
    assert built.alias_groups == {
        "default": "default",
        "replica": "default",
        "analytics": "a",
        "analytics_replica": "a",
    }
