"""Finding the rules and allowances that apply to a request in a few dict lookups.

Entries are indexed by their exact ``(tenant, feature, model)`` scope, ``*`` included as a
literal key. A request can only match the entries filed under one of the 8 keys made by taking
each of its three values or ``*``, and the index remembers which of those 8 wildcard patterns
any entry uses, so a lookup costs at most 8 (usually 1-3) dict probes however many entries there
are. Matches come back in document order, which decides which downgrade applies.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

from inference.rules.contract import WILDCARD

T = TypeVar("T")

# Each pattern says which of (tenant, feature, model) are taken from the request (True) or are `*`.
Pattern = tuple[bool, bool, bool]


class ScopeIndex(Generic[T]):
    def __init__(self, entries: Iterable[tuple[tuple[str, str, str], T]]) -> None:
        by_key: dict[tuple[str, str, str], list[tuple[int, T]]] = {}
        patterns: set[Pattern] = set()
        for order, (key, entry) in enumerate(entries):
            by_key.setdefault(key, []).append((order, entry))
            patterns.add((key[0] != WILDCARD, key[1] != WILDCARD, key[2] != WILDCARD))
        # Per key: its entries alone (returned as they are when only one key matches, the common
        # case) and with their document positions (merged and sorted when several keys match).
        self._by_key = {key: (tuple(e for _, e in found), tuple(found)) for key, found in by_key.items()}
        # Most specific first; the order only matters for speed, results are re-sorted.
        self._patterns = tuple(sorted(patterns, reverse=True))
        self.size = sum(len(found) for found in by_key.values())

    def match(self, tenant: str, feature: str, model: str) -> Sequence[T]:
        """Every entry whose scope matches, in document order."""
        by_key = self._by_key
        first: tuple[tuple[T, ...], tuple[tuple[int, T], ...]] | None = None
        merged: list[tuple[int, T]] | None = None
        for use_tenant, use_feature, use_model in self._patterns:
            found = by_key.get((tenant if use_tenant else WILDCARD, feature if use_feature else WILDCARD,
                                model if use_model else WILDCARD))
            if found is None:
                continue
            if first is None:
                first = found
            else:
                if merged is None:
                    merged = list(first[1])
                merged.extend(found[1])
        if first is None:
            return ()
        if merged is None:
            return first[0]
        merged.sort(key=_order)
        return [entry for _, entry in merged]


def _order(hit: tuple[int, object]) -> int:
    return hit[0]
