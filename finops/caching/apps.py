from django.apps import AppConfig


class CachingConfig(AppConfig):
    name = "finops.caching"
    verbose_name = "Semantic cache"
    default_auto_field = "django.db.models.BigAutoField"
