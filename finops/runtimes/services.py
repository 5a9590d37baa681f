"""Writes to the runtime registry: register a runtime, issue, rotate and revoke its tokens; store,
push and serve the ruleset compiled for each runtime.

A plain token exists only in the return value of the service that issued it; the database keeps
its SHA-256 digest and first characters (``RuntimeToken.issue``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import random
from collections.abc import Mapping
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

PUSH_ATTEMPTS = 6  # attempts in one push: the first and five retries, each one Celery task run
PUSH_BACKOFF_BASE_S = 0.5
PUSH_BACKOFF_CAP_S = 8.0
# A push still queued this long after it was due is stale (a backlog); the next evaluation queues
# a fresh one for any runtime still behind, so it is dropped rather than run late.
PUSH_EXPIRES_S = 60.0
PUSH_TIMEOUT = httpx.Timeout(5.0, connect=2.0)
# Sends within one attempt when the runtime answers 409 holding a version above ours (re-issued
# above it and sent again at once, no wait): one is enough unless something else keeps pushing it.
PUSH_REISSUES = 2
MAX_ANSWER_BYTES = 64 * 1024
MAX_VERSION = 2**63 - 1


@dataclass(frozen=True)
class PushOutcome:
    runtime: str
    pushed_version: int | None
    acknowledged: int | None  # what the runtime said it holds, if it said
    accepted: bool
    attempt: int
    detail: str
    retry: bool = False  # a transient failure with attempts left: try again after push_delay(attempt)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Transient(Exception):
    """A failure worth retrying: the runtime was unreachable, slow, or briefly unable to answer."""


def push_delay(attempt: int, *, base: float = PUSH_BACKOFF_BASE_S, cap: float = PUSH_BACKOFF_CAP_S,
               rng: random.Random | None = None) -> float:
    """Capped exponential backoff with full jitter after failed attempt number ``attempt`` (1, 2, …):
    a uniform draw from [0, min(cap, base × 2^(attempt−1))], so runtimes recovering together are
    not hit in lockstep."""
    return (rng or random).uniform(0.0, min(cap, base * 2 ** (attempt - 1)))


def ruleset_push(*, runtime: Runtime, attempt: int = 1, attempts: int = PUSH_ATTEMPTS, version: int | None = None,
                 client: httpx.Client | None = None) -> PushOutcome:
    """One attempt to PUT ``runtime``'s newest ruleset to ``{base_url}/admin/ruleset`` with its
    admin token. It never waits between attempts: an unreachable runtime, a timeout, 429 or 5xx
    comes back with ``retry`` set while ``attempt < attempts``, and the caller (the Celery task
    ``push_ruleset``) schedules the next attempt ``push_delay(attempt)`` from now, so no worker is
    held while a runtime is down. The last one records that it gave up.

    200 ``{"version"}`` and 409 ``{"version"}`` (the version the runtime already holds) record the
    runtime's acknowledged version; a 409 above everything issued here re-issues the document above
    it (``ruleset_reissue_above``) and sends it again at once. Any other answer (401, 403, 404,
    422, …) will not get better by itself, so it is recorded and not retried. Each attempt that
    sends records its time, version and outcome on the ruleset.

    Nothing is sent when the runtime already holds the newest version, or when ``version`` (the
    version this push began with) is older than the newest: the evaluation that issued the newer
    one queued a push of its own, which supersedes this one.
    """
    ruleset = Ruleset.objects.select_related("runtime").filter(runtime=runtime, version__gt=0).first()
    if ruleset is None:
        return PushOutcome(runtime.name, None, None, False, attempt, "no ruleset compiled yet")
    held = ruleset.runtime.last_ruleset_ack
    if version is not None and ruleset.version > version:
        return PushOutcome(runtime.name, version, held, False, attempt,
                           f"superseded: v{ruleset.version} was issued since, and pushed on its own")
    if held == ruleset.version:
        return PushOutcome(runtime.name, ruleset.version, held, True, attempt,
                           f"nothing to push: runtime holds v{held}")
    Ruleset.objects.filter(pk=ruleset.pk).update(push_started_at=timezone.now())
    own_client = client is None
    client = client or httpx.Client(timeout=PUSH_TIMEOUT, follow_redirects=False, trust_env=False)
    try:
        outcome = _push_and_reissue(client, runtime, ruleset, attempt, attempts)
    finally:
        if own_client:
            client.close()
    Ruleset.objects.filter(pk=ruleset.pk).update(
        last_push_at=timezone.now(), last_push_version=outcome.pushed_version, last_push_outcome=outcome.detail[:300])
    if not outcome.accepted and outcome.acknowledged is None:
        logger.log(logging.INFO if outcome.retry else logging.WARNING, "ruleset push to %s: %s", runtime.name,
                   outcome.detail)
    return outcome


def _push_and_reissue(client: httpx.Client, runtime: Runtime, ruleset: Ruleset, attempt: int,
                      attempts: int) -> PushOutcome:
    for _ in range(1 + PUSH_REISSUES):
        try:
            outcome = _push_once(client, runtime, ruleset, attempt)
        except _Transient as exc:
            if attempt < attempts:
                return PushOutcome(runtime.name, ruleset.version, None, False, attempt,
                                   f"attempt {attempt} of {attempts} failed, retrying: {exc}", retry=True)
            return PushOutcome(runtime.name, ruleset.version, None, False, attempt,
                               f"gave up after {attempt} attempts: {exc}")
        if outcome.acknowledged is None or outcome.acknowledged <= ruleset.version:
            return outcome
        current = ruleset_reissue_above(runtime=runtime, held=outcome.acknowledged)
        if current is None or current.version <= outcome.acknowledged:
            return outcome
        ruleset = current
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
