"""Names a client chose (tenants, features, models, end users, runtimes), as the pages show and link them.

Names come from the runtimes' telemetry, and rows stored before ingest refused control characters
may hold any string at all: a line break, a NUL, a right-to-left override. A page shows each such
character as its escape (``\\n``, ``\\x00``, ``\\u202e``), so a name never looks like another one and
nothing re-orders the text around it. A name links to its own page through ``NameConverter``, which
takes any string (Django's ``path`` converter stops at a line break, so reversing a link to such a
name raised ``NoReverseMatch``: every page that listed it answered 500); the few names a browser
cannot carry in a path are shown without a link (``detail_url``).
"""

from __future__ import annotations

import re

from django.urls import reverse

# C0 and C1 controls and DEL, the Unicode line and paragraph separators, and the bidirectional
# controls (the "Trojan Source" characters), which would reorder what a page shows around them.
INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in SHORT_ESCAPES:
        return SHORT_ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(name: str) -> str:
    """``name`` with every invisible or reordering character written as its escape."""
    return INVISIBLE.sub(_escape, name)


def linkable(name: str) -> bool:
    """Whether a link to ``name``'s page leads back to the same name. Not for a NUL (no database
    query can carry one: PostgreSQL refuses it) nor for a ``.`` or ``..`` between slashes, which a
    browser resolves away before it asks (``/features/a/../`` is ``/features/``)."""
    return bool(name) and "\x00" not in name and not {".", ".."} & set(name.split("/"))


def detail_url(*, dimension: str, name: str) -> str | None:
    """The path of ``name``'s page (percent-encoded), or None where no link can lead back to it."""
    if not linkable(name):
        return None
    return reverse(f"dashboards:{dimension}", args=[name])


class NameConverter:
    """A URL part that is any name: slashes, spaces and line breaks included."""

    regex = r"[\s\S]+"

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value
