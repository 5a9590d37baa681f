"""The runtime's periodic pull of its ruleset from the control plane (reconciliation beside push).

Every ``interval_s`` it GETs ``{finops_url}/api/v1/ruleset`` with the ingest token and the held
version in ``X-Wattson-Ruleset-Version``: 200 carries a document (applied when newer), 304 means
the runtime is up to date. Anything else — a refused connection, a 500, a malformed document — is
logged and retried with a doubling delay capped at ``max(interval_s, 60 s)``; the loop never ends
on an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Literal

import httpx

from inference.backoff import backoff_s
from inference.rules.contract import MAX_DOCUMENT_BYTES, RulesetInvalid
from inference.rules.enforcement import RulesetNotNewer
from inference.rules.keeper import RulesetKeeper

log = logging.getLogger("inference.rules")

RULESET_PATH = "/api/v1/ruleset"
VERSION_HEADER = "X-Wattson-Ruleset-Version"
MAX_BACKOFF_S = 60.0

PullOutcome = Literal["applied", "not_modified", "not_newer", "failed"]


class RulesetPuller:
    def __init__(self, keeper: RulesetKeeper, *, url: str, token: str | None, interval_s: float,
                 timeout_s: float = 10.0) -> None:
        self.keeper = keeper
        self.url = url.rstrip("/") + RULESET_PATH
        self.token = token
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.failures_in_a_row = 0
        self.failed_total = 0
        self.last_success_at: float | None = None
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s))
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ruleset-pull")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def next_delay_s(self) -> float:
        if self.failures_in_a_row == 0:
            return self.interval_s
        return backoff_s(self.failures_in_a_row + 1, base_s=self.interval_s,
                         cap_s=max(self.interval_s, MAX_BACKOFF_S), jitter=0)

    async def _run(self) -> None:
        while True:
            try:
                await self.pull_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let a bug of ours end the loop
                log.exception("ruleset pull failed unexpectedly")
                self._failed()
            await asyncio.sleep(self.next_delay_s())

    async def pull_once(self) -> PullOutcome:
        """One pull; the outcome says what happened (errors are logged, never raised)."""
        client = self._client
        if client is None:
            raise RuntimeError("the puller is not started")
        headers = {VERSION_HEADER: str(self.keeper.enforcer.version), "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            async with client.stream("GET", self.url, headers=headers) as response:
                if response.status_code == 304:
                    return self._succeeded("not_modified")
                if response.status_code != 200:
                    self._log_failure("ruleset pull from %s answered %d", self.url, response.status_code)
                    return self._failed()
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        self._log_failure("ruleset pull from %s: the document is over %d bytes", self.url,
                                          MAX_DOCUMENT_BYTES)
                        return self._failed()
        except httpx.HTTPError as exc:
            self._log_failure("ruleset pull from %s failed: %s: %s", self.url, type(exc).__name__, exc)
            return self._failed()
        try:
            await self.keeper.accept(bytes(body))
        except RulesetNotNewer:
            return self._succeeded("not_newer")
        except RulesetInvalid as exc:
            log.error("ruleset pull from %s: refused an invalid document: %s", self.url, exc.message)
            return self._failed()
        except OSError:
            log.exception("ruleset pull: the document could not be saved")
            return self._failed()
        return self._succeeded("applied")

    def _log_failure(self, message: str, *args: object) -> None:
        # The first failure of a run and every tenth after it are warnings; the rest would only
        # repeat them, once a minute at most.
        quiet = self.failures_in_a_row % 10 != 0
        log.log(logging.DEBUG if quiet else logging.WARNING, message, *args)

    def _succeeded(self, outcome: PullOutcome) -> PullOutcome:
        if self.failures_in_a_row:
            log.info("ruleset pull from %s works again after %d failures", self.url, self.failures_in_a_row)
        self.failures_in_a_row = 0
        self.last_success_at = time.time()
        return outcome

    def _failed(self) -> PullOutcome:
        self.failures_in_a_row += 1
        self.failed_total += 1
        return "failed"
