"""What the control plane's answer to a batch means for the batch's records.

finops's ingest (``finops/telemetry/views.py``) answers a batch with:

- 202 ``{"accepted", "duplicates", "refused": [{"kind", "index", "event_id", "errors"}]}``: every
  record is stored except the refused ones (``index``: the record's place in its list);
- 422, code ``all_records_refused``, the same body and an ``error``: every record was refused;
- 400, code ``invalid_batch``: the body as a whole is not a batch;
- 413, code ``too_many_records`` or ``body_too_large``: send fewer records at once;
- 401 for a bad token, 503 with ``Retry-After`` while its database is down, 500 for its bugs.

A 2xx counts as finops's only with its result in the body (a JSON object whose ``accepted`` is a
whole number): a proxy or a captive portal answering 200 with a page of its own has stored nothing,
so its 200 is retried like any other foreign answer.

Only those refusals set records aside, and only when the answer is finops's own: its error body
(``{"error": {"type", "message", "code", "param"}}``) with one of its codes. Any other answer (a
proxy's HTML 400, Django's DisallowedHost page, another JSON shape, a 404 or 405 from something in
between, a code this runtime does not know) says nothing about the records: they are kept and sent
again after a backoff, and the failure shows on ``/health``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

INVALID_BATCH = "invalid_batch"
ALL_REFUSED = "all_records_refused"
TOO_LARGE = ("too_many_records", "body_too_large")
_KIND_TAGS = {"event": "E", "sample": "S"}
_REASON_CHARS = 2000


class Verdict(Enum):
    DONE = "done"  # the collector is through with the batch: stored, except ``refusals``
    SPLIT = "split"  # send the batch in halves (too large, or one record spoils a batch of several)
    RETRY = "retry"  # nothing is known of the records: keep them and try again later


@dataclass(frozen=True)
class Answer:
    verdict: Verdict
    problem: str = ""  # what went wrong, for the log and ``last_error``
    status: int | None = None  # None: no answer at all
    refusals: dict[int, str] = field(default_factory=dict)  # the record's place in the batch -> reason
    retry_after_s: float | None = None
    unplaced: int = 0  # refusals in a 2xx that named no record of the batch (logged, nothing kept)


def read_answer(status: int, headers: Mapping[str, str], body: bytes, *, kinds: Sequence[str]) -> Answer:
    """What ``status`` and ``body`` mean for a batch whose records have ``kinds`` (``E``/``S``), in order."""
    text = body[:_REASON_CHARS].decode(errors="replace")
    document = _json_object(body)
    if 200 <= status < 300 and not _ingest_result(document):
        return Answer(Verdict.RETRY, f"HTTP {status} without the control plane's ingest result: {text}", status,
                      retry_after_s=_retry_after(headers))
    if 200 <= status < 300:
        refused = document.get("refused") if document is not None else None
        refusals, unplaced = _placed(refused if isinstance(refused, list) else [], kinds, status)
        return Answer(Verdict.DONE, status=status, refusals=refusals, unplaced=unplaced)
    error = _finops_error(document)
    code = error["code"] if error is not None else None
    problem = f"HTTP {status}" + (f" {code}" if code else "") + f": {error['message'] if error else text}"
    count = len(kinds)
    if status == 413 and count > 1:
        return Answer(Verdict.SPLIT, problem, status)  # whoever said it, fewer records cannot hurt
    if status == 400 and code == INVALID_BATCH:
        # A body of records this runtime wrote is a batch; halving finds the record that spoils it.
        if count > 1:
            return Answer(Verdict.SPLIT, problem, status)
        return Answer(Verdict.DONE, problem, status, {0: problem})
    if status == 413 and code in TOO_LARGE:
        return Answer(Verdict.DONE, problem, status, {0: problem})  # one record too large to store
    if status == 422 and code == ALL_REFUSED and document is not None:
        refused = document.get("refused")
        refusals, _ = _placed(refused if isinstance(refused, list) else [], kinds, status)
        return Answer(Verdict.DONE, problem, status, {i: refusals.get(i, problem) for i in range(count)})
    return Answer(Verdict.RETRY, problem, status, retry_after_s=_retry_after(headers))


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


def _ingest_result(document: dict[str, Any] | None) -> bool:
    accepted = document.get("accepted") if document is not None else None
    return isinstance(accepted, int) and not isinstance(accepted, bool)


def _finops_error(document: dict[str, Any] | None) -> dict[str, Any] | None:
    """The error of finops's error body, or None when the body is something else."""
    error = document.get("error") if document is not None else None
    if not isinstance(error, dict) or not {"type", "message", "code", "param"} <= error.keys():
        return None
    if not all(isinstance(error[key], str) for key in ("type", "message", "code")):
        return None
    return error


def _placed(refused: list[Any], kinds: Sequence[str], status: int) -> tuple[dict[int, str], int]:
    """Each refusal's place in the batch and its reason; and how many named no record of it."""
    places: dict[str, list[int]] = {"E": [], "S": []}
    for place, kind in enumerate(kinds):
        places[kind].append(place)
    refusals: dict[int, str] = {}
    unplaced = 0
    for item in refused:
        kind = item.get("kind") if isinstance(item, dict) else None
        tag = _KIND_TAGS.get(kind) if isinstance(kind, str) else None
        index = item.get("index") if isinstance(item, dict) else None
        if tag is None or not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(places[tag]):
            unplaced += 1
            continue
        errors = item.get("errors", item.get("problems"))
        what = "; ".join(str(e) for e in errors) if isinstance(errors, list) else str(errors or "no reason given")
        refusals[places[tag][index]] = f"HTTP {status}: {kind} {index}: {what}"[:_REASON_CHARS]
    return refusals, unplaced


def _retry_after(headers: Mapping[str, str]) -> float | None:
    try:
        return max(0.0, float(headers.get("Retry-After", "")))
    except ValueError:
        return None
