"""What the runtime gives up under load besides shedding, and how it tells the client.

From half its target wait on (``AdmissionQueue.past_target``), before admission sheds anything,
free-tier keys get shorter answers: their ``max_tokens`` is capped (``--free-max-tokens-under-load``),
so the capacity that is left goes further. Past the target low-priority work is shed, past twice
the target normal work (admission's ``overloaded`` reason). A capped response carries
``x-wattson-degraded: max_tokens_capped=N``, and its event names the cap in ``rule_id``
(``load:free_max_tokens``) when no ruleset rule acted.
"""

from __future__ import annotations

from inference.admission import AdmissionQueue
from inference.config import Tier

DEGRADED_HEADER = "x-wattson-degraded"
LOAD_CAP_RULE_ID = "load:free_max_tokens"
# The first rung of the ladder: shorter free answers before any work is shed.
CAP_PAST_TARGET = 0.5


def cap_under_load(*, limit: int | None, tier: Tier, admission: AdmissionQueue, asked: int | None,
                   cap: int | None, default_max_tokens: int) -> int | None:
    """The free tier's cap when it shortens this request now, else None (not free, not under load,
    or the request already asks for no more)."""
    if limit is None or tier != "free" or not admission.past_target(CAP_PAST_TARGET):
        return None
    length = asked if asked is not None else default_max_tokens
    if cap is not None:
        length = min(length, cap)
    return limit if length > limit else None
