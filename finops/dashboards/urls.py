from django.urls import path

from finops.dashboards import views

app_name = "dashboards"
urlpatterns = [
    path("", views.overview, name="overview"),
    path("features/", views.breakdown, {"dimension": "feature"}, name="features"),
    path("features/<path:value>/", views.detail, {"dimension": "feature"}, name="feature"),
    path("tenants/", views.breakdown, {"dimension": "tenant"}, name="tenants"),
    path("tenants/<path:value>/", views.detail, {"dimension": "tenant"}, name="tenant"),
    path("models/", views.breakdown, {"dimension": "model"}, name="models"),
    path("models/<path:value>/", views.detail, {"dimension": "model"}, name="model"),
    path("gpus/", views.gpus, name="gpus"),
]
