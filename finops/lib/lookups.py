"""``field = ANY(array)``: one parameter for a list of values, where ``field__in`` sends one per value.

A pass over 10,000 budgets filters on thousands of primary keys at a time; with ``__in``, psycopg
splits and quotes a query of 2,500 parameters on every call (a tenth of a second each on a
loaded 2-core machine). One array parameter costs nothing to split; SQLite reads the same list
from one JSON text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from django.db.models import Lookup


class AnyOf(Lookup):
    """``AnyOf(F("pk"), ids)``: true where the field's value is one of ``values``; use it as a
    filter (``Budget.objects.filter(AnyOf(F("pk"), ids))``)."""

    lookup_name = "any_of"
    prepare_rhs = False

    def __init__(self, lhs: Any, values: Iterable[Any]) -> None:
        super().__init__(lhs, list(values))

    def as_sql(self, compiler: Any, connection: Any) -> tuple[str, tuple[Any, ...]]:
        lhs, params = self.process_lhs(compiler, connection)
        cast = self.lhs.output_field.cast_db_type(connection)
        return f"{lhs} = ANY(%s::{cast}[])", (*params, self.rhs)

    def as_sqlite(self, compiler: Any, connection: Any) -> tuple[str, tuple[Any, ...]]:
        lhs, params = self.process_lhs(compiler, connection)
        return f"{lhs} IN (SELECT value FROM json_each(%s))", (*params, json.dumps(self.rhs))
