from django.urls import path

from finops.runtimes import views

urlpatterns = [
    path("ruleset", views.ruleset, name="ruleset-pull"),
]
