from django.urls import path

from finops.telemetry import openapi, views

urlpatterns = [
    path("events", views.ingest_events, name="ingest-events"),
    path("openapi.json", openapi.openapi_view, name="machine-api-openapi"),
]
