"""An operator's view of the telemetry records set aside (refused by the control plane, or
unreadable), behind ``--admin-token``: list them, put them back in the spool to be sent again, or
discard them. Nothing the exporter sets aside is ever deleted but from here."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from inference.auth import require_admin
from inference.errors import ApiError
from inference.routes import runtime_of
from inference.routes.openapi import operation
from inference.telemetry import TelemetryExporter

router = APIRouter()


def _exporter(request: Request) -> TelemetryExporter:
    runtime = runtime_of(request)
    require_admin(runtime, request)
    if runtime.exporter is None:
        raise ApiError(404, "Telemetry export is off on this runtime (no --finops-url).", code="telemetry_off")
    return runtime.exporter


@router.get("/admin/telemetry/refused", **operation(auth="adminToken", errors=(403, 404)))
async def list_set_aside(request: Request) -> JSONResponse:
    """The records set aside (refused by the control plane, or unreadable), file by file, with why."""
    files = await asyncio.to_thread(_exporter(request).set_aside_files)
    return JSONResponse({"records": sum(f.records + f.unreadable for f in files), "bytes": sum(f.bytes for f in files),
                         "files": [f.as_dict() for f in files]})


@router.post("/admin/telemetry/refused/resend", **operation(auth="adminToken", errors=(403, 404, 503)))
async def resend_set_aside(request: Request, file: str | None = None) -> JSONResponse:
    """Put one file's records (``?file=NAME``), or all, back in the spool to be sent again."""
    exporter = _exporter(request)
    resent = await _on_the_spool(exporter.resend_set_aside, file, "The spool's disk refused the records.")
    return JSONResponse({"resent": resent, "set_aside_records": exporter.stats()["set_aside_records"]})


@router.delete("/admin/telemetry/refused/{name}", **operation(auth="adminToken", errors=(403, 404, 503)))
async def discard_set_aside(request: Request, name: str) -> JSONResponse:
    """Delete one file of set-aside records for good."""
    exporter = _exporter(request)
    discarded = await _on_the_spool(exporter.discard_set_aside, name, "The spool's disk refused to delete the file.")
    return JSONResponse({"discarded": discarded})


async def _on_the_spool(action: Callable[[str | None], int], name: str | None, failed: str) -> int:
    """Run an operator's action on a set-aside file off the event loop: 404 for a name that is
    not one, 503 when the disk refuses."""
    try:
        return await asyncio.to_thread(action, name)
    except KeyError:
        raise ApiError(404, f"No file of set-aside records is named {name!r}; GET /admin/telemetry/refused lists "
                       "them.", code="set_aside_file_not_found", param="file") from None
    except OSError:
        raise ApiError(503, failed, code="spool_unwritable", retry_after_s=5) from None
