"""Read queries over raw telemetry that more than one part of the control plane needs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from finops.telemetry.models import Device, RuntimeEventCount

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


@dataclass(frozen=True)
class EventCompleteness:
    """What a runtime recorded against what the control plane stored, in events with a sequence.

    ``recorded``: the highest count a runtime reported (a sample's ``events_recorded``) or the
    highest ``seq`` stored, whichever is larger. ``stored``: events with a seq stored, each once.
    ``missing``: sequence numbers up to the highest one stored that no stored event carries —
    lost, or refused by ingest. Records above the highest seq stored may still be on their way (in
    the runtime's spool or in flight) and are not called missing; they are ``recorded − stored −
    missing``, and become missing once a later record is stored while they are not."""

    recorded: int
    stored: int
    missing: int


def event_completeness() -> dict[str, EventCompleteness]:
    """Per runtime that has sent a sequence number or an ``events_recorded``, its counts."""
    return {
        runtime_id: EventCompleteness(recorded=max(recorded, highest), stored=stored,
                                      missing=max(highest - stored, 0))
        for runtime_id, recorded, stored, highest in
        RuntimeEventCount.objects.values_list("runtime_id", "recorded", "stored", "highest_stored")
    }
