from django.urls import path, register_converter

from finops.dashboards import views
from finops.dashboards.names import NameConverter

register_converter(NameConverter, "name")

app_name = "dashboards"
urlpatterns = [
    path("", views.overview, name="overview"),
    path("features/", views.breakdown, {"dimension": "feature"}, name="features"),
    path("features/<name:value>/", views.detail, {"dimension": "feature"}, name="feature"),
    path("tenants/", views.breakdown, {"dimension": "tenant"}, name="tenants"),
    path("tenants/<name:value>/", views.detail, {"dimension": "tenant"}, name="tenant"),
    path("models/", views.breakdown, {"dimension": "model"}, name="models"),
    path("models/<name:value>/", views.detail, {"dimension": "model"}, name="model"),
    path("gpus/", views.gpus, name="gpus"),
    path("exports/focus.csv", views.focus_export, name="focus"),
]
