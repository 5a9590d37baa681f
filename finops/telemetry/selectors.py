"""Read queries over raw telemetry that more than one part of the control plane needs."""

from __future__ import annotations

from collections.abc import Iterable

from finops.telemetry.models import Device


def device_types_for(*, devices: Iterable[str | None]) -> dict[str | None, str]:
    """The price book's device type of each device an event names: 'cpu', or the GPU's NVML name
    as its samples reported it. An unknown GPU is left out and prices at the book's '*' row."""
    devices = set(devices)
    types: dict[str | None, str] = {"cpu": "cpu"} if "cpu" in devices else {}
    uuids = [d for d in devices if d and d != "cpu"]
    if uuids:
        types.update(Device.objects.filter(uuid__in=uuids).values_list("uuid", "name"))
    return types
