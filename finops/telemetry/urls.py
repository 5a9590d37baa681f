from django.urls import path

from finops.telemetry import focus_api, openapi, views

urlpatterns = [
    path("events", views.ingest_events, name="ingest-events"),
    path("focus", focus_api.focus_export_api, name="focus-export"),
    path("openapi.json", openapi.openapi_view, name="machine-api-openapi"),
]
