"""Tasks over the whole loop: a runtime whose upstream fails, with a fallback, exports to a live
control plane; a task whose first two attempts fail (the upstream, then its retry) and whose third
(the fallback) succeeds is one successful task costing all three; a task the client gives up on is
waste; the overview's tiles and the features CSV agree with a raw SQL computation over the events."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import time
from decimal import Decimal
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.db.models import Sum
from django.test import Client
from pytest_django.live_server_helper import LiveServer

from finops.dashboards.templatetags.dashboard_format import money
from finops.pricing.models import ANY, DevicePrice, ModelPrice, PriceBook
from finops.runtimes.services import runtime_register
from finops.telemetry.models import RequestEvent
from finops.telemetry.ranges import Filters
from finops.telemetry.rollups import rollup_run
from inference.config import Fallback, Upstream
from inference.engine.models import LoadedModel
from tests.finops.test_client_tasks import raw_task_sql
from tests.inference.fake_upstream import fake_upstream
from tests.inference.live import serve, slowed, tiny_config

pytestmark = pytest.mark.django_db(transaction=True)
Q = Decimal("1e-9")


def chat(model: str, **fields: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "Summarise the ticket"}], **fields}


def test_a_task_that_took_three_attempts_is_one_successful_task_and_an_abandoned_one_is_waste(
    live_server: LiveServer, tiny_model: LoadedModel, tmp_path: Path
) -> None:
    book = PriceBook.objects.create(name="list", effective_from=dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
    for model in ("tiny-random", "big"):
        ModelPrice.objects.create(book=book, model=model, prompt_per_1m=Decimal("100"),
                                  completion_per_1m=Decimal("400"))
    DevicePrice.objects.create(book=book, device_type=ANY, per_gpu_hour=Decimal("2.50"), per_kwh=Decimal("0.20"))
    runtime, token = runtime_register(name="tasks-runtime", base_url="http://127.0.0.1:1")
    started = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)

    with fake_upstream() as fake:
        config = dataclasses.replace(
            tiny_config(runtime_id=runtime.name, finops_url=live_server.url, finops_token=token,
                        spool_dir=tmp_path / "spool", export_interval_s=0.2, sample_interval_s=0.5,
                        upstreams=(Upstream("big", fake.url, "vendor/big"), Upstream("solo", fake.url, "vendor/solo")),
                        fallbacks=(Fallback("big", ("tiny-random",)),)),
            upstream_timeout_s=1.0, upstream_retries=1, upstream_retry_backoff_s=0.01, breaker_min_requests=1000)
        # 10 ms a step: a long answer cannot beat a 0.3 s deadline.
        with serve(config, preloaded=(slowed(tiny_model, 0.01),)) as live:
            fake.fail(503, "overloaded")
            summary = live.client(**{"X-Wattson-Feature": "summaries", "X-Wattson-Task": "ticket-1"})
            answered = summary.post("/v1/chat/completions", json=chat("big", max_tokens=8, ignore_eos=True))
            assert answered.status_code == 200, answered.text
            # A task the client gives up on: two requests under one task id, each answered by the
            # local model until its deadline passed, then never tried again.
            search = live.client(**{"X-Wattson-Feature": "search", "X-Wattson-Task": "lookup-9",
                                    "X-Wattson-Deadline": "0.3"})
            for _ in range(2):
                gave_up = search.post("/v1/chat/completions",
                                      json=chat("tiny-random", max_tokens=400, ignore_eos=True))
                assert gave_up.status_code == 504, gave_up.text
            # An ordinary request: a task of one attempt.
            plain = live.client(**{"X-Wattson-Feature": "search"}).post(
                "/v1/chat/completions", json=chat("tiny-random", max_tokens=4))
            assert plain.status_code == 200, plain.text
            recorded = len(live.wait_for_events(6))
            deadline = time.monotonic() + 20
            while RequestEvent.objects.count() < recorded and time.monotonic() < deadline:
                time.sleep(0.1)
    assert RequestEvent.objects.count() == recorded == 6

    rollup_run(now=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1))
    ticket = RequestEvent.objects.filter(task_id="ticket-1").order_by("attempt")
    assert [(e.attempt, e.model_served, e.status) for e in ticket] == [
        (1, "big", "error"), (2, "big", "error"), (3, "tiny-random", "ok")]
    lookup = RequestEvent.objects.filter(task_id="lookup-9")
    assert [e.status for e in lookup] == ["timeout", "timeout"]
    waste = lookup.aggregate(cost=Sum("list_cost"))["cost"]
    assert waste > 0, "the abandoned task's attempts generated tokens before their deadline"

    filters = Filters(start=started, end=started + dt.timedelta(minutes=30))
    raw = raw_task_sql(filters, "feature")
    ticket_cost = ticket.aggregate(cost=Sum("list_cost"))["cost"]
    assert raw[("summaries", True)] == (1, 3, ticket_cost.quantize(Q))
    assert raw[("search", False)] == (1, 2, waste.quantize(Q))

    # The features CSV and the overview's tiles say the same.
    user = get_user_model().objects.create_user("pm", password="pw")
    client = Client()
    client.force_login(user)
    query = {"range": "custom", "start": f"{started:%Y-%m-%dT%H:%M}",
             "end": f"{filters.end:%Y-%m-%dT%H:%M}"}
    response = client.get("/features/", {**query, "format": "csv", "table": "features"})
    rows = {row["feature"]: row for row in csv.DictReader(io.StringIO(response.content.decode()))}
    assert (rows["summaries"]["tasks"], rows["summaries"]["successful_tasks"], rows["summaries"]["task_attempts"]) == (
        "1", "1", "3")
    assert Decimal(rows["summaries"]["cost_per_successful_task_usd"]) == ticket_cost
    assert Decimal(rows["summaries"]["waste_usd"]) == 0
    assert (rows["summaries"]["requests"], rows["summaries"]["attempts"]) == ("1", "3")
    search_ok = raw[("search", True)]
    assert (rows["search"]["tasks"], rows["search"]["successful_tasks"]) == ("2", "1")
    assert Decimal(rows["search"]["waste_usd"]).quantize(Q) == waste.quantize(Q)
    assert Decimal(rows["search"]["cost_per_successful_task_usd"]).quantize(Q) == search_ok[2]

    page = client.get("/", query).content.decode()
    successful_cost = ticket_cost + search_ok[2]
    assert money(successful_cost / 2) in page
    assert money(waste) in page
    assert "2 of 3 tasks succeeded" in page
