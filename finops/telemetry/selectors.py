"""Read queries over raw telemetry that more than one part of the control plane needs."""

from __future__ import annotations

from collections.abc import Iterable

from finops.telemetry.models import Device

# (runtime_id, device) as an event names them: a device is its runtime's.
RuntimeDevice = tuple[str, str | None]


def device_types_for(*, devices: Iterable[RuntimeDevice]) -> dict[RuntimeDevice, str]:
    """The price book's device type of each (runtime, device) an event names: 'cpu', or the GPU's
    NVML name as that runtime's samples reported it. A GPU its runtime never named is left out and
    prices at the book's '*' row, whatever another runtime calls a device of the same uuid."""
    devices = set(devices)
    types: dict[RuntimeDevice, str] = {key: "cpu" for key in devices if key[1] == "cpu"}
    gpus = {key for key in devices if key[1] and key[1] != "cpu"}
    if gpus:
        rows = Device.objects.filter(runtime_id__in={r for r, _ in gpus}, uuid__in={d for _, d in gpus})
        types.update(((runtime_id, uuid), name) for runtime_id, uuid, name in
                     rows.values_list("runtime_id", "uuid", "name") if (runtime_id, uuid) in gpus)
    return types

