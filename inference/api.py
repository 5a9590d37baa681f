"""The HTTP application: ``create_app`` wires the runtime and the job runner to the routers
(``inference.routes``: completions, jobs, control), the error handlers and the service's own
``/health``, ``/metrics`` and, for an operator, the telemetry records set aside
(``/admin/telemetry/refused``).

The HTTP layer parses and checks what clients send and hands it to the serving pipeline
(``inference.serving``); it knows nothing about tensors.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from inference import __version__
from inference.auth import require_admin
from inference.config import RuntimeConfig
from inference.errors import ApiError, install_error_handlers
from inference.jobs import JobRunner, JobStore
from inference.routes import completions, control, jobs, runtime_of
from inference.runtime import Runtime
from inference.serving import run_job_attempt
from inference.telemetry import TelemetryExporter

service = APIRouter()  # the runtime's own state, for probes and scrapers


@service.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while the runtime serves: ``ok``, or ``degraded`` with the reasons in ``reasons``
    (telemetry waiting too long, refused, turned away or failing to send); 503 while it starts."""
    runtime = runtime_of(request)
    exporter = runtime.exporter
    reasons = exporter.problems() if exporter is not None else []
    status = ("degraded" if reasons else "ok") if runtime.ready else "starting"
    return JSONResponse(
        {"status": status, "reasons": reasons, "runtime_id": runtime.config.runtime_id,
         "models": sorted(runtime.backends), "queue_depth": runtime.queue_depth(), "running": runtime.running(),
         "telemetry": exporter.stats() if exporter is not None else None},
        status_code=200 if runtime.ready else 503,
    )


@service.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = runtime_of(request).metrics.render()
    return Response(body, media_type=content_type)


set_aside = APIRouter()  # an operator's view of the telemetry records set aside, behind --admin-token


def _exporter(request: Request) -> TelemetryExporter:
    runtime = runtime_of(request)
    require_admin(runtime, request)
    if runtime.exporter is None:
        raise ApiError(404, "Telemetry export is off on this runtime (no --finops-url).", code="telemetry_off")
    return runtime.exporter


@set_aside.get("/admin/telemetry/refused")
async def list_set_aside(request: Request) -> JSONResponse:
    """The records set aside (refused by the control plane, or unreadable), file by file, with why."""
    files = await asyncio.to_thread(_exporter(request).set_aside_files)
    return JSONResponse({"records": sum(f.records + f.unreadable for f in files), "bytes": sum(f.bytes for f in files),
                         "files": [f.as_dict() for f in files]})


@set_aside.post("/admin/telemetry/refused/resend")
async def resend_set_aside(request: Request, file: str | None = None) -> JSONResponse:
    """Put one file's records (``?file=NAME``), or all, back in the spool to be sent again."""
    exporter = _exporter(request)
    resent = await _on_the_spool(exporter.resend_set_aside, file, "The spool's disk refused the records.")
    return JSONResponse({"resent": resent, "set_aside_records": exporter.stats()["set_aside_records"]})


@set_aside.delete("/admin/telemetry/refused/{name}")
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


def create_app(config: RuntimeConfig, runtime: Runtime | None = None) -> FastAPI:
    runtime = runtime or Runtime(config)
    runner = JobRunner(JobStore(config.resolved_state_dir / "jobs.sqlite3"), partial(run_job_attempt, runtime),
                       concurrency=config.jobs_concurrency, max_attempts=config.job_max_attempts,
                       ttl_s=config.job_ttl_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        await runner.start()
        try:
            yield
        finally:
            await runner.stop()  # first: running jobs are left to the next start, not failed
            await runtime.stop()

    app = FastAPI(title="Wattson inference runtime", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.runtime, app.state.jobs = runtime, runner
    install_error_handlers(app)
    for router in (control.router, jobs.router, service, set_aside, completions.router):
        app.include_router(router)
    return app
