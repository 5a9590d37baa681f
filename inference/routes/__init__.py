"""The runtime's HTTP endpoints, one ``APIRouter`` per area: ``completions`` (the OpenAI-compatible
API), ``jobs`` (async jobs and their dead-letter list) and ``control`` (what the control plane calls:
the ruleset). ``inference.api.create_app`` includes them; the work is ``inference.serving``'s.

A route finds the runtime and the job runner on ``request.app.state`` through ``runtime_of`` and
``jobs_of``: plain calls, so a request pays for no dependency resolution on the way in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from inference.jobs import JobRunner
    from inference.runtime import Runtime


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def jobs_of(request: Request) -> JobRunner:
    jobs: JobRunner = request.app.state.jobs
    return jobs
