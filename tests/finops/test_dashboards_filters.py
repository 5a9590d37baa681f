"""The filter bar's state comes from query parameters: presets and custom ranges in the org's time
zone, one value per dimension; anything unusable falls back to the default with a message."""

from __future__ import annotations

import datetime as dt

import pytest

from finops.dashboards.filterbar import filter_state_parse

NOW = dt.datetime(2026, 11, 22, 10, 17, 30, tzinfo=dt.UTC)


@pytest.mark.parametrize(("preset", "length", "step"), [
    ("1h", dt.timedelta(hours=1), "minute"), ("24h", dt.timedelta(hours=24), "hour"),
    ("7d", dt.timedelta(days=7), "hour"), ("30d", dt.timedelta(days=30), "day"),
])
def test_presets_end_at_the_next_whole_minute(preset: str, length: dt.timedelta, step: str) -> None:
    state = filter_state_parse({"range": preset}, now=NOW)
    assert state.end == dt.datetime(2026, 11, 22, 10, 18, tzinfo=dt.UTC)
    assert state.length == length and state.step == step and not state.problems


def test_the_default_is_the_last_24_hours_and_leaves_the_url_clean() -> None:
    state = filter_state_parse({}, now=NOW)
    assert state.range == "24h" and state.query() == ""
    assert state.query(sort="name") == "?sort=name"


def test_a_custom_range_is_read_in_the_org_time_zone(settings) -> None:
    settings.ORG_TIME_ZONE = "America/New_York"
    state = filter_state_parse({"range": "custom", "start": "2026-11-20T09:00", "end": "2026-11-21T09:00"}, now=NOW)
    assert state.start == dt.datetime(2026, 11, 20, 14, 0, tzinfo=dt.UTC)
    assert state.step == "hour"
    assert state.params() == {"range": "custom", "start": "2026-11-20T09:00", "end": "2026-11-21T09:00"}


def test_a_custom_range_without_an_end_runs_to_now() -> None:
    state = filter_state_parse({"range": "custom", "start": "2026-11-22T09:30"}, now=NOW)
    assert state.end == dt.datetime(2026, 11, 22, 10, 18, tzinfo=dt.UTC) and state.step == "minute"


def test_a_long_custom_range_is_charted_per_day() -> None:
    state = filter_state_parse({"range": "custom", "start": "2026-09-01", "end": "2026-11-01"}, now=NOW)
    assert state.step == "day"


def test_an_old_short_range_uses_hours_where_minutes_have_expired(settings) -> None:
    settings.MINUTE_ROLLUP_RETENTION_DAYS = 7
    state = filter_state_parse({"range": "custom", "start": "2026-10-01T09:00", "end": "2026-10-01T10:00"}, now=NOW)
    assert state.step == "hour"


def test_dimension_values_go_to_the_selectors_filters() -> None:
    state = filter_state_parse({"tenant": "acme", "model": "smollm2"}, now=NOW)
    filters = state.filters()
    assert filters.tenants == ("acme",) and filters.features == () and filters.models == ("smollm2",)
    assert state.filters(tenant="globex").tenants == ("globex",)


@pytest.mark.parametrize("query", [
    {"range": "2w"}, {"range": "custom", "start": "soon"}, {"range": "custom", "start": "2026-11-22T11:00"},
    {"range": "custom", "start": "2020-01-01", "end": "2026-01-01"}, {"feature": "x" * 201},
    {"range": "custom", "start": "0001-01-01", "end": "0001-01-02"}, {"range": "custom", "start": "2026-02-30"},
    {"range": "custom", "start": "9999-12-30T00:00", "end": "9999-12-31T23:59"},
    {"tenant": "acme\x00"},
])
def test_anything_unusable_falls_back_with_a_message(query: dict[str, str]) -> None:
    state = filter_state_parse(query, now=NOW)
    assert state.problems
    assert state.tenant == "" and state.feature == ""
    if "range" in query:
        assert state.range == "24h" and state.length == dt.timedelta(hours=24)
