"""Client-chosen names on a page: ``{{ name|visible }}`` shows control characters as escapes
(``finops.dashboards.names``)."""

from __future__ import annotations

from django import template

from finops.dashboards import names

register = template.Library()


@register.filter
def visible(value: str | None) -> str:
    return names.visible(value) if value else ""
