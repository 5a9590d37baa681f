from django.urls import path

from finops.budgets import views

app_name = "budgets"
urlpatterns = [
    path("", views.budget_list, name="list"),
    path("new/", views.budget_new, name="create"),
    path("<int:pk>/", views.budget_detail, name="detail"),
    path("<int:pk>/edit/", views.budget_edit, name="edit"),
    path("<int:pk>/pause/", views.budget_pause_toggle, name="pause"),
    path("<int:pk>/delete/", views.budget_remove, name="delete"),
]
