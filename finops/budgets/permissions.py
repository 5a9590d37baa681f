"""Who may change budgets: members of the ``budget-admin`` group (and superusers). Everyone else
who is logged in, product managers included, reads them."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse

BUDGET_ADMIN = "budget-admin"
PRODUCT_MANAGER = "product-manager"


def can_edit_budgets(user: Any) -> bool:
    if not user.is_authenticated or not user.is_active:
        return False
    return user.is_superuser or user.groups.filter(name=BUDGET_ADMIN).exists()


def budget_admin_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Login first (a redirect to the login page), then 403 for anyone not a budget admin."""

    @wraps(view)
    def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not can_edit_budgets(request.user):
            raise PermissionDenied("Only budget admins may change budgets.")
        return view(request, *args, **kwargs)

    return login_required(guarded)
