"""A telemetry record as the spool keeps it: a kind tag and the record's JSON, exactly as sent."""

from __future__ import annotations

import json
from dataclasses import dataclass

KINDS = ("E", "S")  # E: request event, S: runtime sample


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """One record: its kind (``E`` request event, ``S`` runtime sample) and its serialized JSON."""

    kind: str
    data: bytes

    def line(self) -> bytes:
        return self.kind.encode() + b" " + self.data + b"\n"


def parse_line(raw: bytes) -> SpoolRecord | None:
    """A complete line (with its newline) as a record, or None when it is not a valid one."""
    if len(raw) < 5 or raw[1:2] != b" " or raw[:1].decode("latin-1") not in KINDS or not raw.endswith(b"\n"):
        return None
    data = raw[2:-1]
    try:
        if not isinstance(json.loads(data), dict):
            return None
    except ValueError:
        return None
    return SpoolRecord(kind=raw[:1].decode(), data=data)
