"""The whole loop over real HTTP: a runtime serves tenants and features, exports to a live control
plane, rollups run, and the dashboards' selectors give the totals of the raw events exactly."""

from __future__ import annotations

import datetime as dt
import math
import time
from decimal import Decimal
from pathlib import Path

import openai
import pytest
from django.db.models import Sum
from pytest_django.live_server_helper import LiveServer

from finops.pricing.models import ANY, DevicePrice, ModelPrice, PriceBook
from finops.runtimes.services import runtime_register
from finops.telemetry.latency import latency_percentiles
from finops.telemetry.models import RequestEvent
from finops.telemetry.ranges import Filters
from finops.telemetry.rollups import rollup_run
from finops.telemetry.sketch import ALPHA
from finops.telemetry.usage import usage_by, usage_totals
from inference.engine.models import LoadedModel
from tests.inference.live import ACME, GLOBEX, INITECH, serve, tiny_config

pytestmark = pytest.mark.django_db(transaction=True)


def exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.floor(q * (len(ordered) - 1)))]


def test_selectors_equal_raw_sums_after_real_traffic(
    live_server: LiveServer, tiny_model: LoadedModel, tmp_path: Path
) -> None:
    book = PriceBook.objects.create(name="list", effective_from=dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
    ModelPrice.objects.create(book=book, model="tiny-random", prompt_per_1m=Decimal("0.10"),
                              completion_per_1m=Decimal("0.40"))
    DevicePrice.objects.create(book=book, device_type=ANY, per_gpu_hour=Decimal("2.50"), per_kwh=Decimal("0.20"))
    runtime, token = runtime_register(name="system-runtime", base_url="http://127.0.0.1:1")
    started = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)

    config = tiny_config(runtime_id=runtime.name, finops_url=live_server.url, finops_token=token,
                         spool_dir=tmp_path / "spool", export_interval_s=0.2, sample_interval_s=0.5)
    with serve(config, preloaded=(tiny_model,)) as live:
        plan = [(ACME, "search", 6), (ACME, "summaries", 3), (GLOBEX, "search", 4), (INITECH, "chat", 5)]
        for key, feature, count in plan:
            client = openai.OpenAI(base_url=live.base_url + "/v1", api_key=key, max_retries=0,
                                   default_headers={"X-Wattson-Feature": feature})
            for i in range(count):
                client.chat.completions.create(model="tiny-random", max_tokens=3 + i,
                                               messages=[{"role": "user", "content": f"{feature} {i}"}],
                                               extra_body={"ignore_eos": True})
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny-random", max_tokens=-1, messages=[])
        served = len(live.events)
        deadline = time.monotonic() + 20
        while RequestEvent.objects.count() < served and time.monotonic() < deadline:
            time.sleep(0.1)
    assert RequestEvent.objects.count() == served == 19

    # Roll up what has arrived (the settle window is skipped by rolling "from the future").
    rollup_run(now=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1))
    end = started + dt.timedelta(minutes=10)
    totals = usage_totals(filters=Filters(start=started, end=end))
    raw = RequestEvent.objects.aggregate(prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"),
                                         list_cost=Sum("list_cost"), hardware_cost=Sum("hardware_cost"),
                                         gpu=Sum("gpu_seconds"))
    assert totals.requests == 19 and totals.errors == 1
    assert (totals.prompt_tokens, totals.completion_tokens) == (raw["prompt"], raw["completion"])
    assert totals.list_cost == raw["list_cost"] and totals.list_cost > 0
    assert totals.hardware_cost == raw["hardware_cost"] and totals.hardware_cost > 0
    assert totals.gpu_seconds == pytest.approx(raw["gpu"])
    assert totals.energy_joules is None, "no energy measured on a CPU: n/a, not zero"

    by_tenant = {row.value: row.requests for row in usage_by(filters=Filters(start=started, end=end),
                                                           dimension="tenant")}
    assert by_tenant == {"acme": 9, "globex": 4, "initech": 6}
    search = usage_totals(filters=Filters(start=started, end=end, features=("search",)))
    assert search.requests == 10

    latencies = list(RequestEvent.objects.values_list("e2e_ms", flat=True))
    for q, value in latency_percentiles(filters=Filters(start=started, end=end), metric="e2e").items():
        exact = exact_quantile(latencies, q)
        assert value is not None and abs(value - exact) <= ALPHA * exact + 1e-9
