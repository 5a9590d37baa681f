"""``power_cap`` rules: the ruleset holds GPUs at a power limit through NVML (a fake with the real
API's shape: milliwatts, the same function names, pynvml's own errors) and gives each GPU its limit
back when the rule expires, a newer document drops it, or the runtime stops. A limit the driver
refuses is a clear log line and a metric, never a crash and never a retry every second."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pynvml
import pytest

from inference.gpu import GpuMonitor, PowerLimitRefused
from inference.power_caps import PowerCaps
from inference.rules.compiled import CompiledPowerCap, ruleset_compile
from inference.rules.contract import PowerCapAction, RulesetInvalid, ruleset_parse
from tests.inference.fake_nvml import FakeGpu, FakeNvml
from tests.inference.live import LiveRuntime, serve, tiny_config
from tests.inference.rulesets import ADMIN_TOKEN, admin, at, document, metric, push, rule, scope

H100 = "NVIDIA H100 80GB HBM3"
L4 = "NVIDIA L4"


@dataclass
class Clock:
    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now


def cap(watts: int, *, device: str = "*", device_type: str = "*", expires_at: float | None = None,
        rule_id: str = "cap") -> CompiledPowerCap:
    return CompiledPowerCap(id=rule_id, action=PowerCapAction(type="power_cap", watts=watts, device=device,
                                                              device_type=device_type),
                            reason="", expires_at=expires_at)


def boards() -> list[FakeGpu]:
    return [FakeGpu(uuid="GPU-a", name=H100, power_limit_mw=700_000),
            FakeGpu(uuid="GPU-b", name=H100, power_limit_mw=650_000),
            FakeGpu(uuid="GPU-c", name=L4, power_limit_mw=72_000, power_limit_min_mw=40_000,
                    power_limit_max_mw=72_000)]


def test_a_cap_by_device_type_sets_only_those_gpus_and_the_lowest_cap_wins() -> None:
    a, b, c = gpus = boards()
    caps = PowerCaps(GpuMonitor(nvml=FakeNvml(gpus)), clock=Clock())

    caps.reconcile([cap(500, device_type=H100), cap(450, device="GPU-b", rule_id="b")])

    assert (a.power_limit_mw, b.power_limit_mw, c.power_limit_mw) == (500_000, 450_000, 72_000)
    assert caps.applied() == {"GPU-a": 500, "GPU-b": 450}


def test_holding_a_cap_sets_it_once() -> None:
    a, *_ = gpus = boards()
    caps = PowerCaps(GpuMonitor(nvml=FakeNvml(gpus)), clock=Clock())

    for _ in range(3):
        caps.reconcile([cap(500, device="GPU-a")])

    assert a.limit_history == [500_000]
    assert caps.changes_total == 1


def test_an_expired_or_dropped_cap_gives_each_gpu_its_own_limit_back() -> None:
    a, b, _ = gpus = boards()
    clock = Clock()
    caps = PowerCaps(GpuMonitor(nvml=FakeNvml(gpus)), clock=clock)
    caps.reconcile([cap(400, device="GPU-a", expires_at=clock.now + 60), cap(300, device="GPU-b")])

    clock.now += 61
    caps.reconcile([cap(400, device="GPU-a", expires_at=clock.now - 1), cap(300, device="GPU-b")])
    assert (a.power_limit_mw, b.power_limit_mw) == (700_000, 300_000), "a's cap expired, b's holds"

    caps.reconcile([])
    assert (a.limit_history, b.limit_history) == ([400_000, 700_000], [300_000, 650_000])
    assert caps.applied() == {}


def test_a_changed_cap_still_restores_the_limit_from_before_the_first() -> None:
    a, *_ = gpus = boards()
    caps = PowerCaps(GpuMonitor(nvml=FakeNvml(gpus)), clock=Clock())
    caps.reconcile([cap(500, device="GPU-a")])
    caps.reconcile([cap(350, device="GPU-a")])

    caps.restore_all()

    assert a.limit_history == [500_000, 350_000, 700_000]


def test_no_cap_is_set_after_the_caps_were_restored_for_a_stop() -> None:
    a, *_ = gpus = boards()
    caps = PowerCaps(GpuMonitor(nvml=FakeNvml(gpus)), clock=Clock())
    caps.reconcile([cap(500, device="GPU-a")])
    caps.restore_all()

    caps.reconcile([cap(500, device="GPU-a")])  # a reconcile that was still on its way

    assert a.limit_history == [500_000, 700_000]


@pytest.mark.parametrize(("board", "watts", "reason", "message"), [
    (FakeGpu(uuid="GPU-a", errors={"nvmlDeviceSetPowerManagementLimit": pynvml.NVML_ERROR_NO_PERMISSION}), 300,
     "no_permission", "Insufficient Permissions"),
    (FakeGpu(uuid="GPU-a"), 100, "out_of_range", "this board allows 200-700 W"),
    (FakeGpu(uuid="GPU-a", unsupported={"nvmlDeviceSetPowerManagementLimit"}), 300, "not_supported", "Not Supported"),
])
def test_a_limit_the_driver_refuses_is_an_error_with_its_reason_and_a_metric_once(
        board: FakeGpu, watts: int, reason: str, message: str, caplog: pytest.LogCaptureFixture) -> None:
    caps = PowerCaps(GpuMonitor(nvml=FakeNvml([board])), clock=Clock())

    for _ in range(3):
        caps.reconcile([cap(watts)])

    assert caps.failures == {("GPU-a", reason): 1}, "refused once, not retried every second"
    assert [r.levelname for r in caplog.records] == ["ERROR"] and message in caplog.text
    assert board.power_limit_mw == 700_000 and caps.applied() == {}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in caps.samples()}
    assert samples[("wattson_power_cap_failures_total", (("device", "GPU-a"), ("reason", reason)))] == 1


def test_the_monitor_names_the_refusal_and_the_boards_range() -> None:
    monitor = GpuMonitor(nvml=FakeNvml([FakeGpu(uuid="GPU-a")]))
    with pytest.raises(PowerLimitRefused, match=r"GPU GPU-a refused a 900 W power limit.*200-700 W") as refused:
        monitor.set_power_limit_w(0, 900)
    assert refused.value.reason == "out_of_range"
    assert monitor.power_limit_w(0) == 700


@pytest.mark.parametrize(("action", "where", "param"), [
    ({"type": "power_cap", "watts": 0}, scope(), "rules.0.action.watts"),
    ({"type": "power_cap", "watts": 250.5}, scope(), "rules.0.action.watts"),
    ({"type": "power_cap", "watts": 250, "devices": "*"}, scope(), "rules.0.action.devices"),
    ({"type": "power_cap", "watts": 250}, scope(tenant="acme"), "rules.0"),
])
def test_a_malformed_power_cap_is_refused_naming_the_field(action: dict[str, Any], where: dict[str, str],
                                                           param: str) -> None:
    with pytest.raises(RulesetInvalid) as invalid:
        ruleset_parse(json.dumps(document(rules=[rule("p", action, where=where)])).encode())
    assert invalid.value.param == param


def test_a_power_cap_is_never_matched_to_requests() -> None:
    compiled = ruleset_compile(ruleset_parse(json.dumps(document(rules=[
        rule("p", {"type": "power_cap", "watts": 250, "device_type": H100})])).encode()))

    assert [c.action.watts for c in compiled.power_caps] == [250]
    assert list(compiled.rules.match("acme", "chat", "m")) == []


# -- in a live runtime ------------------------------------------------------------------------------


@pytest.fixture
def gpus() -> list[FakeGpu]:
    return boards()


@pytest.fixture
def live(gpus: list[FakeGpu], tiny_model: Any) -> Iterator[LiveRuntime]:
    with serve(tiny_config(admin_token=ADMIN_TOKEN), preloaded=(tiny_model,),
               gpu=GpuMonitor(nvml=FakeNvml(gpus))) as server:
        yield server


def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.05)


def test_a_pushed_power_cap_is_held_until_it_expires_then_lifted(live: LiveRuntime, gpus: list[FakeGpu]) -> None:
    a, b, c = gpus
    push(live, document(rules=[rule("h100-cap", {"type": "power_cap", "watts": 400, "device_type": H100},
                                    expires_at=at(2.5))]))

    until(lambda: (a.power_limit_mw, b.power_limit_mw) == (400_000, 400_000))
    assert c.limit_history == []
    assert metric(live, "wattson_power_cap_watts", device="GPU-a") == 400

    until(lambda: (a.power_limit_mw, b.power_limit_mw) == (700_000, 650_000), timeout=6)
    assert metric(live, "wattson_power_cap_changes_total") == 4


def test_a_stopping_runtime_lifts_its_caps(gpus: list[FakeGpu], tiny_model: Any) -> None:
    a, *_ = gpus
    with serve(tiny_config(admin_token=ADMIN_TOKEN), preloaded=(tiny_model,),
               gpu=GpuMonitor(nvml=FakeNvml(gpus))) as server:
        push(server, document(rules=[rule("cap", {"type": "power_cap", "watts": 300, "device": "GPU-a"})]))
        until(lambda: a.power_limit_mw == 300_000)

    assert a.limit_history == [300_000, 700_000]


def test_a_newer_document_without_the_cap_lifts_it(live: LiveRuntime, gpus: list[FakeGpu]) -> None:
    _, _, c = gpus
    push(live, document(rules=[rule("l4", {"type": "power_cap", "watts": 50, "device_type": L4})]))
    until(lambda: c.power_limit_mw == 50_000)

    push(live, document())

    until(lambda: c.power_limit_mw == 72_000)
    with admin(live) as client:
        assert client.get("/admin/ruleset").status_code == 200
