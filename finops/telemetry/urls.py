from django.urls import path

from finops.telemetry import views

urlpatterns = [
    path("events", views.ingest_events, name="ingest-events"),
]
