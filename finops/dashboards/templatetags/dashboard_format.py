"""Numbers for people: currency, SI units, percentages, durations. Every filter shows ``n/a`` for
None — a figure that was not measured (GPU power on a CPU machine) — and never turns it into 0."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django import template
from django.utils import timezone

from finops.lib.timezones import org_time_zone

register = template.Library()

NA = "n/a"
SI_PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def _number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@register.filter
def money(value: Any) -> str:
    """US dollars: cents for amounts of a dollar or more, four significant decimals below."""
    number = _number(value)
    if number is None:
        return NA
    sign = "-" if number < 0 else ""
    number = abs(number)
    if number == 0:
        return "$0.00"
    if number >= 1:
        return f"{sign}${number:,.2f}"
    if number >= 0.0001:  # cents, with up to two more digits where they matter: $0.50, $0.0123
        whole, _, fraction = f"{number:.4f}".rstrip("0").partition(".")
        return f"{sign}${whole}.{fraction.ljust(2, '0')}"
    return f"{sign}${number:.2g}"


@register.filter
def si(value: Any, unit: str = "") -> str:
    """A quantity with an SI prefix: 1234567 → "1.23 M"; ``unit`` follows it ("W", "J")."""
    number = _number(value)
    if number is None:
        return NA
    space = " " if unit else ""
    for factor, prefix in SI_PREFIXES:
        if abs(number) >= factor:
            return f"{number / factor:.3g}{space}{prefix}{unit}"
    if number == int(number):
        return f"{int(number):,}{space}{unit}"
    return f"{number:.3g}{space}{unit}"


@register.filter
def count(value: Any) -> str:
    """A whole count with thousands separators (exact below a million, SI above)."""
    number = _number(value)
    if number is None:
        return NA
    return f"{int(number):,}" if abs(number) < 1e6 else si(number)


@register.filter
def percent(value: Any, digits: int = 1) -> str:
    """A fraction (0.123) as a percentage ("12.3%")."""
    number = _number(value)
    if number is None:
        return NA
    return f"{number * 100:.{int(digits)}f}%"


@register.filter
def percent_of_100(value: Any) -> str:
    """A value already in percent (GPU utilisation, 0–100)."""
    number = _number(value)
    return NA if number is None else f"{number:.0f}%"


@register.filter
def duration_ms(value: Any) -> str:
    """Milliseconds as ms below a second, seconds above."""
    number = _number(value)
    if number is None:
        return NA
    if number >= 1000:
        return f"{number / 1000:.2f} s"
    return f"{number:.0f} ms" if number >= 10 else f"{number:.1f} ms"


@register.filter
def energy(value: Any) -> str:
    """Joules as J / kJ / MJ, with kWh beside large amounts (what the power bill counts)."""
    number = _number(value)
    if number is None:
        return NA
    text = si(number, "J")
    if number >= 360_000:
        text += f" ({number / 3.6e6:.2f} kWh)"
    return text


@register.filter
def bytes_(value: Any) -> str:
    number = _number(value)
    if number is None:
        return NA
    for factor, prefix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if number >= factor:
            return f"{number / factor:.1f} {prefix}"
    return f"{int(number)} B"


@register.filter
def local_time(value: Any, fmt: str = "%Y-%m-%d %H:%M %Z") -> str:
    """A moment in the organisation's time zone ("n/a" when never)."""
    if not isinstance(value, dt.datetime):
        return NA
    return timezone.localtime(value, org_time_zone()).strftime(fmt)


@register.filter
def ratio(value: Any, total: Any) -> float | None:
    """value / total, None when either is unknown or the total is zero."""
    a, b = _number(value), _number(total)
    return a / b if a is not None and b else None


@register.filter
def bar_width(fraction: Any) -> int:
    number = _number(fraction)
    return 0 if number is None else max(0, min(100, round(number * 100)))


@register.filter
def na(value: Any) -> Any:
    return NA if value is None else value
