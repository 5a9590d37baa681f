"""Prometheus metrics: counters and histograms fed by request events and engine steps, and samples
read from the live runtime at scrape time: levels as gauges (queue depth, running sequences, GPUs,
spool) and running totals (``*_total``: shed requests, busy seconds, cache hits) as counters."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from inference.contracts import RequestEvent

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)

# `_created` timestamps double every series and no dashboard reads them.
disable_created_metrics()

# The model label of a request for a model this runtime does not serve: never the client's string,
# which would grow a series per name a client makes up. No model can be named so (names are
# letters, digits, '_', '-', '.').
UNSERVED_MODEL = "(unknown)"


class LiveSample(NamedTuple):
    """One value read at scrape time; ``counter`` for a running total (its name ends in ``_total``)."""

    name: str
    help: str
    labels: dict[str, str]
    value: float
    counter: bool = False


SampleReader = Callable[[], Iterable[LiveSample]]


class _LiveSamples(Collector):
    """Reads current values when scraped, from the runtime's readers."""

    def __init__(self, read: SampleReader) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for sample in self._read():
            family = families.get(sample.name)
            if family is None:
                # CounterMetricFamily takes the name without its _total and puts it back on the sample.
                kind = CounterMetricFamily if sample.counter else GaugeMetricFamily
                family = families[sample.name] = kind(sample.name, sample.help, labels=sorted(sample.labels))
            family.add_metric([sample.labels[k] for k in sorted(sample.labels)], sample.value)
        return families.values()


class RuntimeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._models: frozenset[str] = frozenset()
        r = self.registry
        self.requests = Counter("wattson_requests", "Request attempts (a retry or a fallback is one of its own) by "
                                "model and outcome", ["model", "status"], registry=r)
        self.tokens = Counter("wattson_tokens", "Tokens processed", ["model", "kind"], registry=r)
        self.gpu_seconds = Counter("wattson_attributed_gpu_seconds", "Engine busy time attributed to requests",
                                   ["model"], registry=r)
        self.ttft = Histogram("wattson_ttft_seconds", "Time to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("wattson_queue_wait_seconds", "Time waiting for a running slot",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("wattson_e2e_latency_seconds", "Request latency, arrival to last byte",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("wattson_engine_batch_size", "Sequences in each engine step",
                                    ["model", "kind"], buckets=BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram("wattson_engine_step_seconds", "Wall time of each engine step",
                                      ["model", "kind"], buckets=LATENCY_BUCKETS, registry=r)

    def serve_models(self, names: Iterable[str]) -> None:
        """The models (and aliases) requests may be labelled with; any other is ``UNSERVED_MODEL``."""
        self._models = frozenset(names)

    def model_label(self, name: str | None) -> str:
        return name if name is not None and name in self._models else UNSERVED_MODEL

    def watch(self, read: SampleReader) -> None:
        self.registry.register(_LiveSamples(read))

    def observe_event(self, event: RequestEvent) -> None:
        # Bounded: every label value is a served model, a status or a kind, whatever a client sent.
        model = self.model_label(event.model_served or event.model_requested)
        self.requests.labels(model, event.status).inc()
        self.tokens.labels(model, "prompt").inc(event.prompt_tokens)
        self.tokens.labels(model, "completion").inc(event.completion_tokens)
        if event.gpu_seconds:
            self.gpu_seconds.labels(model).inc(event.gpu_seconds)
        if event.ttft_ms is not None:
            self.ttft.labels(model).observe(event.ttft_ms / 1000)
        if event.queue_wait_ms is not None:
            self.queue_wait.labels(model).observe(event.queue_wait_ms / 1000)
        self.e2e.labels(model).observe(event.e2e_ms / 1000)

    def step_observer(self, model: str) -> Callable[[str, int, float], None]:
        def observe(kind: str, batch_size: int, seconds: float) -> None:
            self.batch_size.labels(model, kind).observe(batch_size)
            self.step_seconds.labels(model, kind).observe(seconds)

        return observe

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), "text/plain; version=0.0.4; charset=utf-8"


def gauge(name: str, help_text: str, value: float | None, **labels: Any) -> list[LiveSample]:
    """A level's sample, or none when the value was not measured (absent, never zero)."""
    if name.endswith("_total"):
        raise ValueError(f"{name} is a running total: read it with counter()")
    return _sample(name, help_text, value, labels, counter=False)


def counter(name: str, help_text: str, value: float | None, **labels: Any) -> list[LiveSample]:
    """A running total's sample (its name ends in ``_total``), or none when it was not measured."""
    if not name.endswith("_total"):
        raise ValueError(f"{name} is not named as a running total (…_total): read it with gauge()")
    return _sample(name, help_text, value, labels, counter=True)


def _sample(name: str, help_text: str, value: float | None, labels: dict[str, Any], *,
            counter: bool) -> list[LiveSample]:
    if value is None:
        return []
    return [LiveSample(name, help_text, {k: str(v) for k, v in labels.items()}, float(value), counter)]
