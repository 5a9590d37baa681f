"""A GPU belongs to the runtime that reported it: another runtime naming the same uuid can neither
rename it nor change what its requests cost, and a device's name follows the sample received last,
not the one that claims the latest time (issue 15, item 5)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from finops.pricing.repricing import reprice_range
from finops.telemetry.capacity import idle_capacity
from finops.telemetry.models import Device, RequestEvent
from finops.telemetry.selectors import device_types_for
from tests.finops.conftest import EVENTS_URL
from tests.finops.factories import batch_body, device_dict, event_dict, price_book, runtime_with_token, sample_dict
from tests.finops.test_selectors import device_samples, floor
from tests.finops.test_selectors import event as raw_event
from tests.finops.test_selectors import store as store_raw

pytestmark = pytest.mark.django_db

H100, CHEAP = "NVIDIA H100 80GB HBM3", "NVIDIA T4"
GPU = "GPU-00000000-0000-0000-0000-000000000001"
HOUR = dt.timedelta(hours=1)


def ago(**delta: float) -> dt.datetime:
    return timezone.now() - dt.timedelta(**delta)


@pytest.fixture
def post_as(client: Client) -> Any:
    """POST a batch as the named runtime (registered on first use)."""
    tokens: dict[str, str] = {}

    def post(runtime: str, *, events: list[Any] = (), samples: list[Any] = ()) -> Any:
        if runtime not in tokens:
            tokens[runtime] = runtime_with_token(runtime)[1]
        return client.generic("POST", EVENTS_URL, batch_body(events=events, samples=samples),
                              content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {tokens[runtime]}").json()

    return post


def on(runtime: str, record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "runtime_id": runtime}


def test_another_runtime_cannot_rename_or_reprice_a_runtimes_gpu(post_as: Any) -> None:
    price_book(effective_from=ago(days=1), devices={H100: ("3.60", "0"), CHEAP: ("0.36", "0"), "*": ("0", "0")})
    post_as("rt-a", samples=[on("rt-a", sample_dict(at=ago(minutes=2), devices=[device_dict(device=GPU, name=H100)]))])
    # The attack: rt-b reports rt-a's uuid under another name, dated half a day ahead.
    attack = post_as("rt-b", samples=[on("rt-b", sample_dict(at=timezone.now() + 12 * HOUR,
                                                              devices=[device_dict(device=GPU, name=CHEAP)]))])
    victim = on("rt-a", event_dict(device=GPU, gpu_seconds=2.0, energy_joules=None))
    bystander = on("rt-b", event_dict(device=GPU, gpu_seconds=2.0, energy_joules=None))

    post_as("rt-a", events=[victim])
    post_as("rt-b", events=[bystander])

    assert attack["accepted"] == 1
    assert sorted(Device.objects.values_list("runtime_id", "uuid", "name")) == [
        ("rt-a", GPU, H100), ("rt-b", GPU, CHEAP)]
    # 2 GPU-seconds at the H100's $3.60/hour; rt-b's own requests at what rt-b says its device is
    assert RequestEvent.objects.get(runtime_id="rt-a").hardware_cost == Decimal("0.002")
    assert RequestEvent.objects.get(runtime_id="rt-b").hardware_cost == Decimal("0.0002")


def test_a_device_follows_the_sample_received_last_not_the_latest_claimed_time(post_as: Any) -> None:
    typo = sample_dict(at=timezone.now() + 12 * HOUR, devices=[device_dict(name="NVIDIA H1OO")])
    post_as("rt-1", samples=[typo])
    assert Device.objects.get().name == "NVIDIA H1OO"

    post_as("rt-1", samples=[sample_dict(at=ago(minutes=1), devices=[device_dict(name=H100)])])

    device = Device.objects.get()
    assert device.name == H100
    assert device.last_seen_at <= timezone.now()  # a future-dated sample never dates the device ahead


def test_within_a_batch_the_later_record_names_the_device(post_as: Any) -> None:
    post_as("rt-1", samples=[sample_dict(at=ago(minutes=1), devices=[device_dict(name="first")]),
                             sample_dict(at=ago(minutes=2), devices=[device_dict(name="second")])])

    assert Device.objects.get().name == "second"


def test_device_types_are_looked_up_per_runtime() -> None:
    now = timezone.now()
    Device.objects.create(runtime_id="rt-a", uuid=GPU, name=H100, last_seen_at=now)
    Device.objects.create(runtime_id="rt-b", uuid=GPU, name=CHEAP, last_seen_at=now)

    types = device_types_for(devices=[("rt-a", GPU), ("rt-b", GPU), ("rt-c", GPU), ("rt-a", "cpu"), ("rt-a", None)])

    assert types == {("rt-a", GPU): H100, ("rt-b", GPU): CHEAP, ("rt-a", "cpu"): "cpu"}


def test_repricing_prices_each_runtimes_device_at_its_own_type() -> None:
    start = floor(timezone.now(), "hour") - 2 * HOUR
    Device.objects.create(runtime_id="rt-a", uuid=GPU, name=H100, last_seen_at=start)
    Device.objects.create(runtime_id="rt-b", uuid=GPU, name=CHEAP, last_seen_at=start)
    store_raw([raw_event(start + dt.timedelta(minutes=m), runtime_id=runtime, device=GPU, gpu_seconds=2.0,
                         energy_joules=None) for m, runtime in ((1, "rt-a"), (2, "rt-b"))])
    price_book(effective_from=start - HOUR, devices={H100: ("3.60", "0"), CHEAP: ("0.36", "0")})

    assert reprice_range(start=start, end=start + HOUR) == 2

    assert dict(RequestEvent.objects.values_list("runtime_id", "hardware_cost")) == {
        "rt-a": Decimal("0.002"), "rt-b": Decimal("0.0002")}


def test_idle_capacity_prices_each_runtimes_device_at_its_own_type() -> None:
    start = floor(timezone.now(), "hour") - 2 * HOUR
    price_book(effective_from=start - HOUR, devices={H100: ("3.60", "0"), CHEAP: ("0.36", "0")})
    for runtime, name in (("rt-a", H100), ("rt-b", CHEAP)):
        Device.objects.create(runtime_id=runtime, uuid=GPU, name=name, last_seen_at=start)
        device_samples(runtime, GPU, start, minutes=10, name="sampled name")

    idle = {d.runtime_id: d for d in idle_capacity(start=start, end=start + HOUR)}

    assert (idle["rt-a"].device_type, idle["rt-b"].device_type) == (H100, CHEAP)
    assert (idle["rt-a"].idle_cost, idle["rt-b"].idle_cost) == (Decimal("0.6"), Decimal("0.06"))  # 600 s idle
