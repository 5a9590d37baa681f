"""Tables as CSV downloads: the same rows a page shows, numbers unformatted (plain decimals,
fractions not percentages, empty where not measured), times in ISO 8601 UTC."""

from __future__ import annotations

import csv
import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.http import HttpResponse


@dataclass(frozen=True)
class Table:
    name: str  # the file name's stem
    header: Sequence[str]
    rows: Iterable[Sequence[Any]]


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    return str(value)


def csv_response(table: Table) -> HttpResponse:
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    filename = re.sub(r"[^A-Za-z0-9._-]+", "-", table.name).strip("-") or "export"
    response["Content-Disposition"] = f'attachment; filename="{filename}.csv"'
    writer = csv.writer(response)
    writer.writerow(table.header)
    for row in table.rows:
        writer.writerow([cell(value) for value in row])
    return response
