"""Semantic cache hits in the telemetry and on the dashboards: ingest keeps each hit's kind,
similarity and lookup time; the rollups count semantic hits and their savings apart from exact
ones, equal to the raw sums whether read from rollups or the raw tail, and re-pricing moves them;
the overview and feature pages show them apart, with the threshold in force."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from decimal import Decimal
from typing import Any

import pytest
from django.db.models import Q, Sum
from django.utils import timezone

from finops.caching.models import SemanticCachePolicy
from finops.pricing.repricing import reprice_range
from finops.telemetry.models import RequestEvent
from finops.telemetry.ranges import Filters
from finops.telemetry.rollups import rollup_run
from finops.telemetry.usage import usage_by, usage_totals
from tests.finops.dashboard_factories import logged_in
from tests.finops.factories import batch_body, event_dict, price_book

pytestmark = pytest.mark.django_db

HOUR_AGO = timezone.now().replace(second=0, microsecond=0) - dt.timedelta(hours=1)


def hit(kind: str | None, *, feature: str = "faq", similarity: float | None = None, **fields: Any) -> dict[str, Any]:
    return event_dict(started_at=HOUR_AGO + dt.timedelta(minutes=5), feature=feature, cache_hit=True,
                      cache_kind=kind, cache_similarity=similarity, cache_lookup_ms=4.5, gpu_seconds=0.0,
                      energy_joules=None, **fields)


def traffic(post_batch: Any) -> None:
    price_book(effective_from=HOUR_AGO - dt.timedelta(days=1))  # smollm2: $0.10 / $0.40 per 1M tokens
    events = [
        event_dict(started_at=HOUR_AGO, feature="faq", cache_lookup_ms=6.0),  # a miss, generated
        hit("semantic", similarity=0.93),
        hit("semantic", similarity=0.97, tenant="globex", prompt_tokens=2000),
        hit("exact"),
        hit(None, feature="chat"),  # an older runtime's hit: no kind, counted with the exact ones
    ]
    response = post_batch(batch_body(events=events))
    assert response.status_code == 202, response.content


def raw(**filters: Any) -> tuple[int, Decimal]:
    events = RequestEvent.objects.filter(cache_hit=True, **filters)
    return events.count(), events.aggregate(saved=Sum("saved_cost"))["saved"] or Decimal(0)


def window() -> Filters:
    return Filters(start=HOUR_AGO - dt.timedelta(hours=1), end=HOUR_AGO + dt.timedelta(hours=2))


def test_ingest_keeps_the_hit_kind_similarity_and_lookup_time(post_batch: Any) -> None:
    traffic(post_batch)
    stored = RequestEvent.objects.get(cache_kind="semantic", tenant="acme")
    assert (stored.cache_similarity, stored.cache_lookup_ms) == (0.93, 4.5)
    assert stored.saved_cost > 0 and stored.list_cost == 0
    miss = RequestEvent.objects.get(cache_hit=False)
    assert (miss.cache_kind, miss.cache_similarity, miss.cache_lookup_ms) == (None, None, 6.0)


@pytest.mark.parametrize("bad", [{"cache_kind": "fuzzy"}, {"cache_similarity": 1.5}, {"cache_lookup_ms": -1.0}])
def test_a_malformed_hit_kind_or_similarity_is_refused(post_batch: Any, bad: dict[str, Any]) -> None:
    response = post_batch(batch_body(events=[event_dict(**bad)]))
    body = json.loads(response.content)
    assert body["accepted"] == 0 and len(body["refused"]) == 1, body
    assert next(iter(bad)) in body["refused"][0]["errors"][0]


@pytest.mark.parametrize("rolled", [False, True], ids=["raw tail", "rollups"])
def test_semantic_hits_and_savings_equal_the_raw_sums_apart_from_exact_ones(post_batch: Any, rolled: bool) -> None:
    traffic(post_batch)
    if rolled:
        assert rollup_run(now=timezone.now() + dt.timedelta(minutes=5)).events == 5
    totals = usage_totals(filters=window())
    semantic_hits, semantic_saved = raw(cache_kind="semantic")
    all_hits, all_saved = raw()
    assert (totals.semantic_hits, totals.semantic_saved_cost) == (semantic_hits, semantic_saved) == (2, semantic_saved)
    assert semantic_saved > 0
    assert (totals.cache_hits, totals.saved_cost) == (all_hits, all_saved)
    exact = RequestEvent.objects.filter(Q(cache_kind="exact") | Q(cache_kind__isnull=True), cache_hit=True)
    assert totals.exact_hits == exact.count() == 2
    assert totals.exact_saved_cost == exact.aggregate(saved=Sum("saved_cost"))["saved"]
    by_feature = {row.value: row for row in usage_by(filters=window(), dimension="feature")}
    assert by_feature["faq"].semantic_hits == 2 and by_feature["chat"].semantic_hits == 0
    assert by_feature["faq"].semantic_saved_cost == semantic_saved


def test_repricing_moves_semantic_savings_in_the_rollups(post_batch: Any) -> None:
    traffic(post_batch)
    rollup_run(now=timezone.now() + dt.timedelta(minutes=5))
    price_book(effective_from=HOUR_AGO - dt.timedelta(hours=2), models={"smollm2": ("1.00", "4.00")})
    assert reprice_range(start=HOUR_AGO - dt.timedelta(hours=1), end=HOUR_AGO + dt.timedelta(hours=1)) == 5
    totals = usage_totals(filters=window())
    assert totals.semantic_saved_cost == raw(cache_kind="semantic")[1]
    assert totals.saved_cost == raw()[1]


def test_the_overview_and_feature_pages_show_semantic_hits_apart_with_the_threshold(post_batch: Any) -> None:
    traffic(post_batch)
    SemanticCachePolicy.objects.create(feature="faq", threshold=Decimal("0.9"))
    SemanticCachePolicy.objects.create(feature="support", tenant="globex", threshold=Decimal("0.95"))
    pm = logged_in()
    start, end = (timezone.localtime(HOUR_AGO + dt.timedelta(hours=h)) for h in (-1, 1))
    query = f"?range=custom&start={start:%Y-%m-%dT%H:%M}&end={end:%Y-%m-%dT%H:%M}"
    overview = pm.get("/" + query).content.decode()
    semantic_saved = raw(cache_kind="semantic")[1]
    tile = overview.split('id="kpi-semantic-cache"')[1].split('<div class="kpi"')[0]
    assert "40.0%" in tile  # two of five requests
    assert "2 similar questions served" in tile and f"saved ${semantic_saved:.2f}" in tile
    assert "threshold 0.900 for faq, 0.950 for support (globex)" in tile
    exact = overview.split('id="kpi-exact-cache"')[1].split('<div class="kpi"')[0]
    assert "2 repeats served from cache" in exact
    feature = pm.get("/features/faq/" + query).content.decode()
    assert "threshold 0.900 for faq" in feature and "support" not in feature.split('id="kpi-semantic-cache"')[1][:400]
    chat = pm.get("/features/chat/" + query).content.decode()
    assert "off: no policy for this scope" in chat


def test_the_features_csv_carries_semantic_hits_and_savings(post_batch: Any) -> None:
    traffic(post_batch)
    start, end = (timezone.localtime(HOUR_AGO + dt.timedelta(hours=h)) for h in (-1, 1))
    response = logged_in().get(f"/features/?range=custom&start={start:%Y-%m-%dT%H:%M}&end={end:%Y-%m-%dT%H:%M}"
                               "&format=csv")
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    faq = next(row for row in rows if row["feature"] == "faq")
    assert (int(faq["semantic_cache_hits"]), Decimal(faq["semantic_cache_saved_usd"])) == (
        2, raw(cache_kind="semantic")[1])
