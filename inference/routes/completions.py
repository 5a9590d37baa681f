"""The OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``.
The completions are served by ``inference.serving.serve_completion``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from inference.routes import runtime_of
from inference.routes.openapi import COMPLETION, DEADLINE, FEATURE, GENERATION_ERRORS, PRIORITY, TASK, operation
from inference.schemas import ChatCompletionRequest, CompletionRequest
from inference.serving import serve_completion

router = APIRouter()


@router.get("/v1/models", **operation(auth="apiKey"))
async def models(request: Request) -> JSONResponse:
    runtime = runtime_of(request)
    runtime.authenticate(request.headers.get("authorization"))
    data = [{"id": name, "object": "model", "created": 0, "owned_by": f"wattson:{b.kind}"}
            for name, b in sorted(runtime.backends.items())]
    if runtime.router is not None:
        data.append({"id": runtime.router.alias, "object": "model", "created": 0, "owned_by": "wattson:alias"})
    return JSONResponse({"object": "list", "data": data})


# The headers a generation request reads beside its body.
GENERATION_HEADERS = (FEATURE, PRIORITY, DEADLINE, TASK)


@router.post("/v1/chat/completions", **operation(auth="apiKey", body=ChatCompletionRequest, headers=GENERATION_HEADERS,
                                                 errors=GENERATION_ERRORS, ok=COMPLETION))
async def chat_completions(request: Request) -> Response:
    return await serve_completion(runtime_of(request), request, ChatCompletionRequest)


@router.post("/v1/completions", **operation(auth="apiKey", body=CompletionRequest, headers=GENERATION_HEADERS,
                                            errors=GENERATION_ERRORS, ok=COMPLETION))
async def completions(request: Request) -> Response:
    return await serve_completion(runtime_of(request), request, CompletionRequest)
