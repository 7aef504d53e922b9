from __future__ import annotations

from django.db import models


class Item(models.Model):
    name = models.CharField(max_length=100)

    class Meta:
        app_label = "testapp"

    def __str__(self) -> str:
        return self.name


class Event(models.Model):
    """Lives in the "analytics" replica group (SCALEKIT["GROUPS"])."""

    name = models.CharField(max_length=100)

    class Meta:
        app_label = "testapp"

    def __str__(self) -> str:
        return self.name
