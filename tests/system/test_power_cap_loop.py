"""A power cap end to end over real HTTP: an admin's ``PowerCap`` in the live control plane is
compiled into the runtime's ruleset by the evaluation pass, pushed by the ``push_ruleset`` task
(run eagerly), held by the live runtime on its GPUs through NVML — here the fake NVML with the real
API's shape — and lifted when the cap's schedule ends, by the runtime itself at the rule's expiry.
Then the control plane's next document no longer carries it."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from pytest_django.live_server_helper import LiveServer

from finops.budgets.evaluation import budgets_evaluate
from finops.runtimes.models import PowerCap, Ruleset, Runtime
from finops.runtimes.services import runtime_register
from finops.runtimes.tasks import push_ruleset
from inference.engine.models import LoadedModel
from inference.gpu import GpuMonitor
from tests.inference.fake_nvml import FakeGpu, FakeNvml
from tests.inference.live import serve, tiny_config

pytestmark = pytest.mark.django_db(transaction=True)

H100 = "NVIDIA H100 80GB HBM3"


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def test_a_power_cap_set_in_the_control_plane_is_held_on_the_gpu_and_lifted_when_it_ends(
        live_server: LiveServer, tiny_model: LoadedModel, tmp_path: Path) -> None:
    capped = FakeGpu(uuid="GPU-h100", name=H100, power_limit_mw=700_000)
    other = FakeGpu(uuid="GPU-l4", name="NVIDIA L4", power_limit_mw=72_000, power_limit_min_mw=40_000,
                    power_limit_max_mw=72_000)
    runtime, token = runtime_register(name="power-runtime", base_url="http://127.0.0.1:1")
    config = tiny_config(runtime_id=runtime.name, finops_url=live_server.url, finops_token=token,
                         admin_token=runtime.admin_token(), spool_dir=tmp_path / "spool",
                         state_dir=tmp_path / "state", ruleset_pull_interval_s=3600.0)
    with serve(config, preloaded=(tiny_model,), gpu=GpuMonitor(nvml=FakeNvml([capped, other]))) as live:
        Runtime.objects.filter(pk=runtime.pk).update(base_url=live.base_url)
        ends = timezone.now() + dt.timedelta(seconds=4)
        PowerCap.objects.create(name="evening", device_type=H100, watts=450, ends_at=ends)

        assert not budgets_evaluate().failed
        outcome = push_ruleset.apply(args=(runtime.pk,)).get()
        assert outcome["accepted"], outcome["detail"]
        wait_for(lambda: capped.power_limit_mw == 450_000, "the cap on the H100")
        assert other.limit_history == [], "the L4 is not the cap's device type"
        assert live.runtime.power_caps is not None and live.runtime.power_caps.applied() == {"GPU-h100": 450}

        wait_for(lambda: capped.power_limit_mw == 700_000, "the H100's own limit back after the cap ends")
        assert capped.limit_history == [450_000, 700_000]

        assert not budgets_evaluate().failed
        assert Ruleset.objects.get(runtime=runtime).document["rules"] == [], "an ended cap is not sent again"
