"""A Redis connection the runtime can do without.

Both caches share what they hold across replicas through Redis (``--cache-redis-url``), and both
treat it as an optimisation, never a dependency: every call has a short timeout and no retry, a
failure is counted and answered as a miss by the caller, and after one the cache leaves Redis
alone for ``REDIS_RETRY_AFTER_S`` rather than add a timeout to every request while it is down.
``inference.cache.RedisStore`` (exact answers) and ``inference.semantic_cache.SemanticRedis``
(embedding streams) build their reads and writes on this.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 0.25
REDIS_RETRY_AFTER_S = 5.0


class OptionalRedis:
    """The client, whether it may be used now, and what failed so far."""

    def __init__(self, url: str, *, name: str) -> None:
        try:
            import redis.asyncio as redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError as exc:  # the runtime extra installs it; say what is missing if not
            raise RuntimeError("--cache-redis-url needs the 'redis' package (pip install redis)") from exc
        self.url = url
        self.name = name  # which cache, in the log
        self._client: Any = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S,
                                                 socket_connect_timeout=REDIS_TIMEOUT_S, retry=Retry(NoBackoff(), 0))
        self._skip_until = 0.0
        self.errors = 0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._skip_until

    def _failed(self, what: str, exc: Exception) -> None:
        """Count a failed ``what`` (read, write, flush) and leave Redis alone for a while."""
        self.errors += 1
        if self.available:
            log.warning("%s: Redis %s failed (%s: %s); serving without it for %.0f s",
                        self.name, what, type(exc).__name__, exc, REDIS_RETRY_AFTER_S)
        self._skip_until = time.monotonic() + REDIS_RETRY_AFTER_S

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception as exc:  # closing a connection to a Redis that is gone must not fail the stop
            log.debug("closing the %s's Redis client: %s", self.name, exc)
