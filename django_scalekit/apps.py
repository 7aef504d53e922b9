from __future__ import annotations

from django.apps import AppConfig
from django.core import checks
from django.core.signals import request_finished, request_started, setting_changed


class ScalekitConfig(AppConfig):
    name = "django_scalekit"
    verbose_name = "django-scalekit"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django_scalekit import checks as scalekit_checks
        from django_scalekit import conf, routers

        checks.register(scalekit_checks.check_settings, "scalekit")
        checks.register(scalekit_checks.check_replica_router, "scalekit")
        checks.register(scalekit_checks.check_cdn_and_health_middleware, "scalekit")
        checks.register(scalekit_checks.check_sharding, "scalekit")
        checks.register(
            scalekit_checks.check_scaling_readiness, "scalekit", deploy=True
        )

        def on_setting_changed(*, setting: str, **kwargs: object) -> None:
            if setting in {
                "SCALEKIT",
                "DATABASES",
                "SESSION_COOKIE_SECURE",
                "CACHES",
                "STATIC_URL",
            }:
                conf.clear()
                routers.reset_replica_state()
                routers.forget_connections()

        setting_changed.connect(on_setting_changed, weak=False)

        from django_scalekit import cache

        checks.register(scalekit_checks.check_cache, "scalekit")

        def on_cache_setting_changed(*, setting: str, **kwargs: object) -> None:
            if setting in {"SCALEKIT", "CACHES"}:
                cache.reset()

        setting_changed.connect(on_cache_setting_changed, weak=False)
        request_started.connect(routers._reset_scope_on_request_started, weak=False)
        request_finished.connect(routers._flush_scope_on_request_finished, weak=False)

        try:  # optional: each Celery task gets a scope of its own
            from celery import signals as celery_signals
        except ImportError:
            pass
        else:
            celery_signals.task_prerun.connect(
                routers._begin_scope_on_task_prerun,
                weak=False,
                dispatch_uid="django_scalekit.task_prerun",
            )
            celery_signals.task_postrun.connect(
                routers._end_scope_on_task_postrun,
                weak=False,
                dispatch_uid="django_scalekit.task_postrun",
            )
