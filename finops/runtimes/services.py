"""Writes to the runtime registry: register a runtime, issue, rotate and revoke its tokens; store,
push and serve the ruleset compiled for each runtime.

A plain token exists only in the return value of the service that issued it; the database keeps
its SHA-256 digest and first characters (``RuntimeToken.issue``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from finops.runtimes.models import Ruleset, Runtime, RuntimeToken, admin_token_salt

logger = logging.getLogger("finops.runtimes")


def runtime_register(*, name: str, base_url: str) -> tuple[Runtime, str]:
    """Register a runtime and issue its first token; return the runtime and the plain token.

    Raises ``ValidationError`` for a name that is not a slug, a URL that is not http(s), or a name
    already registered (a runtime is renamed or re-keyed, never registered twice).
    """
    runtime = Runtime(name=name, base_url=base_url)
    # Django's URL validator wants a dotted host; runtimes are often reached by a bare host name.
    runtime.full_clean(exclude=["base_url"], validate_unique=False)
    try:
        runtime_url_validate(base_url)
    except ValidationError as exc:
        raise ValidationError({"base_url": exc.messages}) from exc
    if Runtime.objects.filter(name=name).exists():
        raise _duplicate(name)
    try:
        with transaction.atomic():
            runtime.save()
            _, plain = RuntimeToken.issue(runtime)
    except IntegrityError as exc:  # registered concurrently between the check and the insert
        raise _duplicate(name) from exc
    return runtime, plain


def runtime_token_rotate(*, runtime: Runtime) -> str:
    """Issue a new token for ``runtime`` and revoke every token it had; return the plain new one.

    Rotation is for a token that may have leaked, so the old ones stop working at once; the
    runtime's exporter spools telemetry until it is restarted with the new token.
    """
    with transaction.atomic():
        RuntimeToken.objects.filter(runtime=runtime, revoked_at__isnull=True).update(revoked_at=timezone.now())
        _, plain = RuntimeToken.issue(runtime)
    return plain


def runtime_token_revoke(*, token: RuntimeToken) -> None:
    """Revoke ``token`` (idempotent: a token already revoked keeps its first revocation time)."""
    now = timezone.now()
    if RuntimeToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=now):
        token.revoked_at = now
    else:
        token.refresh_from_db(fields=["revoked_at"])


def runtime_url_validate(url: str) -> None:
    """Accept http(s) URLs with any host (``http://gpu-1:8080``, ``http://10.0.0.5:8080``)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ValidationError(f"{url!r} is not a valid URL", code="invalid") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(f"{url!r} is not a URL starting with http:// or https:// and a host", code="invalid")
    if len(url) > Runtime._meta.get_field("base_url").max_length:
        raise ValidationError("the URL is too long", code="max_length")


def _duplicate(name: str) -> ValidationError:
    return ValidationError({"name": ValidationError(f"a runtime named {name!r} is already registered",
                                                    code="duplicate")})


def runtime_admin_token_rotate(*, runtime: Runtime) -> str:
    """Give ``runtime`` a new admin token (a new salt) and return it; the old one stops working for
    pushes at once, so restart the runtime with the new ``--admin-token``."""
    runtime.admin_token_salt = admin_token_salt()
    runtime.save(update_fields=["admin_token_salt"])
    return runtime.admin_token()


# -- rulesets ------------------------------------------------------------------------------------


def ruleset_digest(content: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def ruleset_store(*, runtime: Runtime, content: Mapping[str, Any], now: dt.datetime | None = None
                  ) -> tuple[Ruleset, bool]:
    """Store ``content`` (a ruleset document without ``version`` and ``issued_at``) as ``runtime``'s
    document; a new version only when the content differs from the stored one. Returns the ruleset
    and whether it got a new version.

    A new version is above both the last one issued and the one the runtime last said it holds,
    so a runtime that holds a version from a restored or recreated control plane accepts it.
    """
    digest = ruleset_digest(content)
    Ruleset.objects.get_or_create(runtime=runtime)
    with transaction.atomic():
        # The stored document is not read (its digest says whether it changed): a fleet's documents
        # are hundreds of kilobytes each, compiled every few seconds.
        ruleset = Ruleset.objects.select_for_update().select_related("runtime").defer("document").get(runtime=runtime)
        if ruleset.digest == digest:
            return ruleset, False
        _issue(ruleset, dict(content), digest, version=max(ruleset.version, ruleset.runtime.last_ruleset_ack or 0) + 1,
               now=now or timezone.now())
    return ruleset, True


def ruleset_reissue_above(*, runtime: Runtime, held: int, now: dt.datetime | None = None) -> Ruleset | None:
    """The runtime holds version ``held``, newer than anything this control plane issued (it was
    restored from a backup, or the runtime was pointed elsewhere): issue the same content again
    above it, or the runtime would refuse every document until our numbers caught up."""
    with transaction.atomic():
        ruleset = Ruleset.objects.select_for_update().filter(runtime=runtime).first()
        # Nothing can be issued above the highest version a document may carry.
        if ruleset is None or not ruleset.digest or held <= ruleset.version or held >= MAX_VERSION:
            return ruleset
        logger.warning("runtime %s holds ruleset v%d, above our v%d: issuing v%d", runtime.name, held,
                       ruleset.version, held + 1)
        content = {k: v for k, v in ruleset.document.items() if k not in ("version", "issued_at")}
        _issue(ruleset, content, ruleset.digest, version=held + 1, now=now or timezone.now())
    return ruleset


def _issue(ruleset: Ruleset, content: dict[str, Any], digest: str, *, version: int, now: dt.datetime) -> None:
    ruleset.version = version
    ruleset.digest = digest
    ruleset.issued_at = now
    ruleset.document = {"version": version, "issued_at": now.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
                        **content}
    ruleset.save(update_fields=["version", "digest", "issued_at", "document"])


def ruleset_pull(*, runtime: Runtime, held: int | None, now: dt.datetime | None = None) -> Ruleset | None:
    """A runtime asked for its ruleset saying it holds version ``held`` (None: it did not say).
    Record that as its acknowledged version and the time it was seen; return its current ruleset
    (None before the first compile)."""
    now = now or timezone.now()
    updates: dict[str, Any] = {"last_seen_at": now}
    if held is not None:
        updates["last_ruleset_ack"] = held
    Runtime.objects.filter(pk=runtime.pk).update(**updates)
    ruleset = Ruleset.objects.filter(runtime=runtime, version__gt=0).first()
    if ruleset is not None and held is not None and held > ruleset.version:
        ruleset = ruleset_reissue_above(runtime=runtime, held=held, now=now)
    return ruleset


# -- push ------------------------------------------------------------------------------------------

PUSH_ATTEMPTS = 6
PUSH_BACKOFF_BASE_S = 0.5
PUSH_BACKOFF_CAP_S = 8.0
PUSH_DEADLINE_S = 30.0
PUSH_TIMEOUT = httpx.Timeout(5.0, connect=2.0)
MAX_ANSWER_BYTES = 64 * 1024
MAX_VERSION = 2**63 - 1


@dataclass(frozen=True)
class PushOutcome:
    runtime: str
    pushed_version: int | None
    acknowledged: int | None  # what the runtime said it holds, if it said
    accepted: bool
    attempts: int
    detail: str


class _Transient(Exception):
    """A failure worth retrying: the runtime was unreachable, slow, or briefly unable to answer."""


def push_delay(attempt: int, *, base: float = PUSH_BACKOFF_BASE_S, cap: float = PUSH_BACKOFF_CAP_S,
               rng: random.Random | None = None) -> float:
    """Capped exponential backoff with full jitter before retry number ``attempt`` (1, 2, …): a
    uniform draw from [0, min(cap, base × 2^(attempt−1))], so runtimes recovering together are not
    hit in lockstep."""
    return (rng or random).uniform(0.0, min(cap, base * 2 ** (attempt - 1)))


def ruleset_push(*, runtime: Runtime, attempts: int = PUSH_ATTEMPTS, deadline_s: float = PUSH_DEADLINE_S,
                 client: httpx.Client | None = None, sleep: Callable[[float], None] = time.sleep) -> PushOutcome:
    """PUT ``runtime``'s newest ruleset to ``{base_url}/admin/ruleset`` with its admin token.

    Unreachable runtimes, timeouts, 429 and 5xx answers are retried with ``push_delay`` up to
    ``attempts`` tries within ``deadline_s``; each try sends the newest document. 200 ``{"version"}``
    and 409 ``{"version"}`` (the version the runtime already holds) record the runtime's
    acknowledged version; a 409 above everything issued here re-issues the document above it
    (``ruleset_reissue_above``) and tries again. Any other answer (401, 403, 404, 422, …) will not
    get better by itself, so it is recorded and not retried.
    """
    Ruleset.objects.filter(runtime=runtime).update(push_started_at=timezone.now())
    own_client = client is None
    client = client or httpx.Client(timeout=PUSH_TIMEOUT, follow_redirects=False, trust_env=False)
    started = time.monotonic()
    tries = 0
    outcome: PushOutcome | None = None
    try:
        while True:
            ruleset = Ruleset.objects.filter(runtime=runtime, version__gt=0).first()
            if ruleset is None:
                return PushOutcome(runtime.name, None, None, False, tries, "no ruleset compiled yet")
            tries += 1
            try:
                outcome = _push_once(client, runtime, ruleset, tries)
            except _Transient as exc:
                outcome = PushOutcome(runtime.name, ruleset.version, None, False, tries, str(exc))
                delay = push_delay(tries)
                if tries >= attempts or time.monotonic() - started + delay > deadline_s:
                    outcome = PushOutcome(runtime.name, ruleset.version, None, False, tries,
                                          f"gave up after {tries} attempts: {exc}")
                    break
                sleep(delay)
                continue
            if outcome.acknowledged is not None and outcome.acknowledged > ruleset.version:
                current = ruleset_reissue_above(runtime=runtime, held=outcome.acknowledged)
                if current is not None and current.version > outcome.acknowledged and tries < attempts:
                    continue
            break
    finally:
        if own_client:
            client.close()
    Ruleset.objects.filter(runtime=runtime).update(
        last_push_at=timezone.now(), last_push_version=outcome.pushed_version, last_push_outcome=outcome.detail[:300])
    if not outcome.accepted and outcome.acknowledged is None:
        logger.warning("ruleset push to %s: %s", runtime.name, outcome.detail)
    return outcome


def _push_once(client: httpx.Client, runtime: Runtime, ruleset: Ruleset, attempt: int) -> PushOutcome:
    url = runtime.base_url.rstrip("/") + "/admin/ruleset"
    headers = {"Authorization": f"Bearer {runtime.admin_token()}", "Content-Type": "application/json"}
    body = json.dumps(ruleset.document, separators=(",", ":")).encode()
    try:
        with client.stream("PUT", url, content=body, headers=headers) as response:
            answer = _read_capped(response)
            status = response.status_code
    except httpx.HTTPError as exc:
        raise _Transient(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc
    if status == 429 or status >= 500:
        raise _Transient(f"HTTP {status}")
    held = _held_version(answer)
    if status == 200:
        if held is None:
            return PushOutcome(runtime.name, ruleset.version, None, False, attempt,
                               "HTTP 200 without a version in the body")
        _acknowledge(runtime, held)
        return PushOutcome(runtime.name, ruleset.version, held, held >= ruleset.version, attempt,
                           f"accepted: runtime holds v{held}")
    if status == 409 and held is not None:
        _acknowledge(runtime, held)
        return PushOutcome(runtime.name, ruleset.version, held, held >= ruleset.version, attempt,
                           f"refused as not newer: runtime holds v{held}")
    return PushOutcome(runtime.name, ruleset.version, None, False, attempt, f"HTTP {status}: {_error_message(answer)}")


def _read_capped(response: httpx.Response) -> bytes:
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            break
    return b"".join(chunks)[:MAX_ANSWER_BYTES]


def _parsed(answer: bytes) -> Any:
    try:
        return json.loads(answer)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _held_version(answer: bytes) -> int | None:
    """``version`` from the answer's body (at the top level, or inside ``error``): a whole number."""
    body = _parsed(answer)
    if not isinstance(body, dict):
        return None
    for place in (body, body.get("error")):
        if isinstance(place, dict):
            value = place.get("version")
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_VERSION:
                return value
    return None


def _error_message(answer: bytes) -> str:
    body = _parsed(answer)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))[:200]
    return answer[:200].decode("utf-8", "replace")


def _acknowledge(runtime: Runtime, held: int) -> None:
    Runtime.objects.filter(pk=runtime.pk).update(last_ruleset_ack=held)
    runtime.last_ruleset_ack = held
