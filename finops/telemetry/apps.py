from django.apps import AppConfig
from django.db.backends.signals import connection_created


class TelemetryConfig(AppConfig):
    name = "finops.telemetry"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from finops.telemetry.sums import sqlite_functions_register

        connection_created.connect(sqlite_functions_register, dispatch_uid="telemetry-sqlite-functions")
