"""What a client sends beside the body's fields, read the same way by every endpoint that takes a
generation request (the sync endpoints and ``POST /v1/jobs``): the JSON body within its size limit,
and the feature, priority and task headers. ``read_capped_body`` is every endpoint's way to read a body
within a limit (``PUT /admin/ruleset`` too)."""

from __future__ import annotations

import json
import re
from typing import TypeVar

from fastapi import Request
from pydantic import ValidationError

from inference.admission import PRIORITY_RANK, PriorityName
from inference.deadline import DEADLINE_HEADER
from inference.errors import ApiError, validation_error

MAX_BODY_BYTES = 4 * 1024 * 1024
FEATURE_HEADER = "x-wattson-feature"
PRIORITY_HEADER = "x-wattson-priority"
TASK_HEADER = "x-wattson-task"
TASK_METADATA_KEY = "task_id"
# A task id reaches pages, URLs and CSV cells through its events: the feature's alphabet, 1-100 long.
TASK_PATTERN = r"^[A-Za-z0-9_.:/\-]{1,100}$"
_TASK_RE = re.compile(TASK_PATTERN)
CACHE_REQUEST_HEADER = "x-wattson-cache"
FEATURE_PATTERN = r"^[A-Za-z0-9_.:/\-]{1,100}$"
DEADLINE_PATTERN = r"^[0-9]{1,9}(\.[0-9]{1,3})?$"
_DEADLINE_RE = re.compile(DEADLINE_PATTERN)
_FEATURE_RE = re.compile(FEATURE_PATTERN)
T = TypeVar("T")


def request_feature(request: Request) -> str:
    feature = request.headers.get(FEATURE_HEADER, "default")
    if not _FEATURE_RE.match(feature):
        raise ApiError(400, "X-Wattson-Feature must be 1-100 letters, digits or _ . : / -",
                       code="invalid_feature", param="X-Wattson-Feature")
    return feature


def request_task(request: Request, metadata: dict[str, str] | None) -> str | None:
    """The task the client names, by the ``X-Wattson-Task`` header or the body's ``metadata.task_id``
    (both given, they must agree); None when it names none (the request is then a task of its own)."""
    header = request.headers.get(TASK_HEADER)
    field = (metadata or {}).get(TASK_METADATA_KEY)
    for value, param in ((header, "X-Wattson-Task"), (field, "metadata.task_id")):
        if value is not None and not _TASK_RE.fullmatch(value):
            raise ApiError(400, f"{param} must be 1-100 letters, digits or _ . : / -", code="invalid_task",
                           param=param)
    if header is not None and field is not None and header != field:
        raise ApiError(400, "X-Wattson-Task and metadata.task_id name different tasks.", code="invalid_task",
                       param="metadata.task_id")
    return header if header is not None else field


def cache_bypassed(request: Request) -> bool:
    """Whether the client asked for a fresh answer: ``x-wattson-cache: bypass`` skips the lookups in
    the exact and the semantic cache (the fresh answer is still kept for the next request)."""
    return request.headers.get(CACHE_REQUEST_HEADER, "").strip().lower() == "bypass"


def request_priority(request: Request, default: PriorityName = "normal") -> PriorityName:
    priority = request.headers.get(PRIORITY_HEADER, default).lower()
    if priority not in PRIORITY_RANK:
        raise ApiError(400, "X-Wattson-Priority must be low, normal or high.", code="invalid_priority",
                       param="X-Wattson-Priority")
    return priority  # type: ignore[return-value]


def request_deadline_s(request: Request, *, limit_s: float) -> float:
    """The seconds the client gives the whole request (``X-Wattson-Deadline``): at most ``limit_s``,
    the runtime's limit, which is also the deadline of a request that does not say."""
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is None:
        return limit_s
    if not _DEADLINE_RE.fullmatch(raw) or not 0 < float(raw) <= limit_s:
        raise ApiError(400, f"X-Wattson-Deadline must be a number of seconds above 0 and at most {limit_s:g} "
                       "(this runtime's limit), with at most 3 decimals.", code="invalid_deadline",
                       param="X-Wattson-Deadline")
    return float(raw)


async def read_capped_body(request: Request, *, limit: int, what: str) -> bytes:
    """The body, refused with a 413 (naming it ``what``) when its Content-Length is over ``limit``
    bytes or not a number, or when more than ``limit`` bytes come: nothing past the limit is kept."""
    declared = request.headers.get("content-length")
    if declared is not None and (not (declared.isascii() and declared.isdigit()) or int(declared) > limit):
        raise _too_large(what, limit)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise _too_large(what, limit)
    return bytes(raw)


def _too_large(what: str, limit: int) -> ApiError:
    return ApiError(413, f"The {what} is larger than {limit} bytes.", code="body_too_large")


async def read_json_object(request: Request) -> dict:
    """The body as a JSON object, refused (413, 400) when too large or not one."""
    raw = await read_capped_body(request, limit=MAX_BODY_BYTES, what="request body")
    try:
        data = json.loads(raw)
        if b"\\u" in raw:  # escapes can spell lone surrogates, which no tokenizer can encode
            json.dumps(data, ensure_ascii=False).encode()
    except (ValueError, UnicodeError, RecursionError):
        raise ApiError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return data


def validated(data: dict, model_cls: type[T], *, within: str | None = None) -> T:
    """``data`` as ``model_cls``, or a 400 naming the first field that is wrong (as a field of
    ``within`` when ``data`` sits inside the request body)."""
    try:
        return model_cls.model_validate(data)  # type: ignore[attr-defined,no-any-return]
    except ValidationError as exc:
        raise validation_error(exc, within=within) from None


async def parse_body(request: Request, model_cls: type[T]) -> T:
    return validated(await read_json_object(request), model_cls)
