"""The HTTP application: ``create_app`` wires the runtime and the job runner to the routers
(``inference.routes``: completions, jobs, control, telemetry), the error handlers, the service's
own ``/health`` and ``/metrics``, and the OpenAPI document at ``/openapi.json`` (the interactive
docs stay off: nothing a runtime serves needs a browser).

The HTTP layer parses and checks what clients send and hands it to the serving pipeline
(``inference.serving``); it knows nothing about tensors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from inference import __version__
from inference.config import RuntimeConfig
from inference.errors import install_error_handlers
from inference.jobs import JobRunner, JobStore
from inference.routes import completions, control, jobs, runtime_of, telemetry
from inference.routes.openapi import openapi_document, operation
from inference.runtime import Runtime
from inference.serving import run_job_attempt

service = APIRouter()  # the runtime's own state, for probes and scrapers


@service.get("/health", **operation(auth=None, ok_also=(503,)))
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


@service.get("/metrics", **operation(auth=None, ok={"text/plain": {"type": "string"}}))
async def metrics(request: Request) -> Response:
    body, content_type = runtime_of(request).metrics.render()
    return Response(body, media_type=content_type)


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
    for router in (control.router, jobs.router, telemetry.router, service, completions.router):
        app.include_router(router)
    app.openapi = partial(openapi_document, app)  # type: ignore[method-assign]
    return app
