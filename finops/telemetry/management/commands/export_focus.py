"""``manage.py export_focus --start 2026-12-01 --end 2026-12-31 --output focus.csv``: cost and usage
of those UTC days (both included) in FOCUS 1.2 columns (``telemetry.focus``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from finops.lib.tables import table_write
from finops.telemetry.focus import FOCUS_VERSION, FocusRangeRefused, focus_days, focus_table


def _day(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise CommandError(f"{text!r} is not a date (YYYY-MM-DD)") from None


class Command(BaseCommand):
    help = f"Export cost and usage per day, runtime, model, tenant and feature as FOCUS {FOCUS_VERSION} CSV."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--start", required=True, help="the first UTC day, YYYY-MM-DD")
        parser.add_argument("--end", required=True, help="the last UTC day (included), YYYY-MM-DD")
        parser.add_argument("--output", required=True, help="the CSV file to write ('-': standard output)")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            start, end = focus_days(first=_day(options["start"]), last=_day(options["end"]))
        except FocusRangeRefused as exc:
            raise CommandError(str(exc)) from None
        table = focus_table(start=start, end=end)
        if options["output"] == "-":
            table_write(table, self.stdout)
            return
        try:
            with open(options["output"], "w", newline="", encoding="utf-8") as out:
                table_write(table, out)
        except OSError as exc:
            raise CommandError(f"cannot write {options['output']}: {exc.strerror}") from None
        self.stderr.write(f"FOCUS {FOCUS_VERSION}: {start:%Y-%m-%d} to {end - dt.timedelta(days=1):%Y-%m-%d} "
                          f"written to {options['output']}")
