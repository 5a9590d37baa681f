from django.apps import AppConfig


class RuntimesConfig(AppConfig):
    name = "finops.runtimes"
    default_auto_field = "django.db.models.BigAutoField"
