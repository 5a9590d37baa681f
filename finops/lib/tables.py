"""Tables as CSV downloads: the same rows a page shows, numbers unformatted (plain decimals,
fractions not percentages, empty where not measured), times in ISO 8601 UTC.

Text comes from clients (a tenant, a feature, the OpenAI ``user`` field) and a spreadsheet runs a
cell that starts like a formula (``=HYPERLINK(...)``), so such text is written with a leading single
quote, as OWASP's CSV injection advice says; numbers are never text here, so ``-1.5`` stays a number."""

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


# OWASP's list (=, +, -, @, tab, carriage return), with the line feed and NUL that ASVS 1.2.10 adds,
# and the full-width forms some spreadsheets read as the ASCII ones.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n", "\0", "\uff1d", "\uff0b", "\uff0d", "\uff20")


def text_cell(text: str) -> str:
    """Client-chosen text as a spreadsheet shows it: as text, never as a formula."""
    return f"'{text}" if text.startswith(FORMULA_STARTS) else text


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    if isinstance(value, str):
        return text_cell(value)
    return str(value)


def table_write(table: Table, out: Any) -> None:
    """``table`` as CSV into ``out`` (a text file or a response)."""
    writer = csv.writer(out)
    writer.writerow(table.header)
    for row in table.rows:
        writer.writerow([cell(value) for value in row])


def csv_response(table: Table) -> HttpResponse:
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    filename = re.sub(r"[^A-Za-z0-9._-]+", "-", table.name).strip("-") or "export"
    response["Content-Disposition"] = f'attachment; filename="{filename}.csv"'
    table_write(table, response)
    return response
