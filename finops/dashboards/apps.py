from django.apps import AppConfig


class DashboardsConfig(AppConfig):
    name = "finops.dashboards"
    default_auto_field = "django.db.models.BigAutoField"
