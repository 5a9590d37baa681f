"""Wattson's control plane: ingest, pricing, rollups, dashboards and budgets (Django)."""

from finops.celery import app as celery_app

__all__ = ("celery_app",)
