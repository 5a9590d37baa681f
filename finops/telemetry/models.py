"""Raw telemetry as the runtimes sent it, priced on arrival, and the rollups built from it.

On PostgreSQL ``RequestEvent`` is partitioned by day on ``started_at`` (see migration 0001) and
keyed on ``(event_id, started_at)``, so a resent record is dropped by the database and a day past
retention is one ``DROP TABLE``. ``received_at`` is when the control plane stored a record: rollups
advance a watermark over it, so an event that arrives late is still counted exactly once.
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.db.models.functions import Now

from finops.pricing.models import COST

# A rollup row sums many events' costs: 26 digits before the point (contracts.py works out why).
ROLLUP_COST = {"max_digits": 38, "decimal_places": COST["decimal_places"]}

STATUS_CLASSES = {
    "ok": "ok",
    "error": "error",
    "timeout": "error",
    "cancelled": "cancelled",
    "rejected_rule": "rejected",
    "rejected_budget": "rejected",
    "shed": "rejected",
}


class RequestEvent(models.Model):
    """One request as measured by a runtime (the request event contract, version 1)."""

    id = models.BigAutoField(primary_key=True)
    event_id = models.UUIDField()
    runtime_id = models.CharField(max_length=100)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()
    received_at = models.DateTimeField(db_default=Now())
    tenant = models.CharField(max_length=100)
    feature = models.CharField(max_length=100)
    end_user = models.CharField(max_length=256, null=True, blank=True)
    api_key_id = models.CharField(max_length=200)
    model_requested = models.CharField(max_length=200)
    model_served = models.CharField(max_length=200, null=True, blank=True)
    route_reason = models.CharField(max_length=100)
    rule_id = models.CharField(max_length=200, null=True, blank=True)
    priority = models.CharField(max_length=10)
    status = models.CharField(max_length=20)
    status_class = models.CharField(max_length=10)
    http_status = models.PositiveSmallIntegerField()
    error_type = models.CharField(max_length=100, null=True, blank=True)
    prompt_tokens = models.PositiveIntegerField()
    completion_tokens = models.PositiveIntegerField()
    cache_hit = models.BooleanField(default=False)
    queue_wait_ms = models.FloatField(null=True, blank=True)
    ttft_ms = models.FloatField(null=True, blank=True)
    e2e_ms = models.FloatField()
    tpot_ms = models.FloatField(null=True, blank=True)
    queue_depth_at_admit = models.PositiveIntegerField(null=True, blank=True)
    mean_batch_size = models.FloatField(null=True, blank=True)
    gpu_seconds = models.FloatField(null=True, blank=True)
    energy_joules = models.FloatField(null=True, blank=True)
    device = models.CharField(max_length=100, null=True, blank=True)
    # The runtime's count of events recorded, this one included; null from older runtimes.
    seq = models.BigIntegerField(null=True, blank=True)
    # The client request this event is one attempt of, and its number within it; null from older runtimes.
    request_id = models.CharField(max_length=100, null=True, blank=True)
    attempt = models.PositiveIntegerField(null=True, blank=True)
    # The task it belongs to (per tenant): the client's name for it, else the request's id; null from older runtimes.
    task_id = models.CharField(max_length=100, null=True, blank=True)
    # A cached answer served past its freshness because no model of the fallback chain could answer.
    cache_stale = models.BooleanField(default=False, db_default=False)
    # How gpu_seconds and energy_joules were obtained: "measured" by the runtime's engine, or
    # "attributed" from outside an upstream engine; null when not measured and from older runtimes.
    device_use_source = models.CharField(max_length=10, null=True, blank=True)
    # Which cache answered a hit ("exact" or "semantic"), a semantic hit's similarity, and the time
    # the cache lookups took; null for other requests and from older runtimes.
    cache_kind = models.CharField(max_length=10, null=True, blank=True)
    cache_similarity = models.FloatField(null=True, blank=True)
    cache_lookup_ms = models.FloatField(null=True, blank=True)
    # Priced on arrival under the book in force when the request started; null when no price applies.
    price_book_id = models.BigIntegerField(null=True, blank=True)
    list_cost = models.DecimalField(**COST, null=True, blank=True)
    hardware_cost = models.DecimalField(**COST, null=True, blank=True)
    # What a cache hit saved at list price (its list_cost is 0); null for other requests.
    saved_cost = models.DecimalField(**COST, null=True, blank=True)
    # Latency sketch bucket indexes (finops.telemetry.sketch), computed once on arrival.
    e2e_bucket = models.SmallIntegerField(null=True, blank=True)
    ttft_bucket = models.SmallIntegerField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["event_id", "started_at"], name="event_once")]
        indexes = [
            models.Index(fields=["received_at"]), models.Index(fields=["started_at", "tenant"]),
            # Budget evaluation asks, every pass, which hard budgets' allowances refused a request this
            # period: refusals are few, a month of events is not.
            models.Index(fields=["rule_id", "started_at"], condition=Q(status="rejected_budget"),
                         name="event_budget_refusals"),
        ]

    def __str__(self) -> str:
        return f"{self.event_id} {self.tenant}/{self.feature} {self.status}"


class RuntimeSample(models.Model):
    runtime_id = models.CharField(max_length=100)
    at = models.DateTimeField()
    received_at = models.DateTimeField(db_default=Now())
    queue_depth = models.PositiveIntegerField()
    running = models.PositiveIntegerField()
    tokens_per_s = models.FloatField()
    kv_cache_used = models.BigIntegerField(null=True, blank=True)
    # Model -> circuit breaker state ("closed", "half_open", "open"); null from runtimes that do not say.
    breakers = models.JSONField(null=True, blank=True)
    events_recorded = models.BigIntegerField(null=True, blank=True, help_text="The highest seq the runtime had given")
    # Each tenant's service since the previous sample: [{"tenant", "tokens_per_s", "queue_wait_ms",
    # "waiting", "running"}] (docs/TELEMETRY.md); null from runtimes that do not say.
    tenants = models.JSONField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["runtime_id", "at"], name="sample_once")]
        indexes = [models.Index(fields=["at"]), models.Index(fields=["received_at"])]

    def __str__(self) -> str:
        return f"{self.runtime_id} @ {self.at:%H:%M:%S}"


class DeviceSample(models.Model):
    runtime_id = models.CharField(max_length=100)
    at = models.DateTimeField()
    received_at = models.DateTimeField(db_default=Now())
    device = models.CharField(max_length=100)
    name = models.CharField(max_length=200, null=True, blank=True)
    gpu_util = models.FloatField(null=True, blank=True)
    mem_used = models.BigIntegerField(null=True, blank=True)
    mem_total = models.BigIntegerField(null=True, blank=True)
    power_w = models.FloatField(null=True, blank=True)
    energy_joules_total = models.FloatField(null=True, blank=True)
    temperature_c = models.FloatField(null=True, blank=True)
    # The board's power limit (a power cap's, or its own); null from older runtimes.
    power_limit_w = models.FloatField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["runtime_id", "device", "at"], name="device_sample_once")]
        indexes = [models.Index(fields=["at"]), models.Index(fields=["received_at"])]

    def __str__(self) -> str:
        return f"{self.device} @ {self.at:%H:%M:%S}"


class Device(models.Model):
    """What NVML called each GPU of a runtime, so that runtime's events on the GPU price at its
    device type. A device belongs to the runtime that reported it: another runtime naming the same
    uuid has a row of its own and can never rename or re-price this one. The name follows the
    sample received last (not the one that claims the latest time)."""

    runtime_id = models.CharField(max_length=100)
    uuid = models.CharField(max_length=100)
    name = models.CharField(max_length=200)
    last_seen_at = models.DateTimeField(help_text="When the sample that named it last was taken (never after "
                                                  "it arrived)")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["runtime_id", "uuid"], name="one_device_per_runtime")]

    def __str__(self) -> str:
        return f"{self.name} ({self.runtime_id} {self.uuid})"


class Granularity(models.TextChoices):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"


class RollupSums(models.Model):
    """What a rollup row adds up over the requests of its bucket and group."""

    requests = models.BigIntegerField(default=0, help_text="Events: attempts, each request's retries and fallbacks too")
    client_requests = models.BigIntegerField(default=0, db_default=0,
                                             help_text="Requests clients sent: events of a request's first attempt")
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cache_hits = models.BigIntegerField(default=0)
    saved_tokens = models.BigIntegerField(default=0, db_default=0,
                                          help_text="Tokens of cache hits: answered again, not generated")
    gpu_seconds = models.FloatField(default=0.0)
    energy_joules = models.FloatField(default=0.0)
    energy_measured = models.BigIntegerField(default=0, help_text="Events whose energy was measured")
    list_cost = models.DecimalField(**ROLLUP_COST, default=0)
    hardware_cost = models.DecimalField(**ROLLUP_COST, default=0)
    saved_cost = models.DecimalField(**ROLLUP_COST, default=0, db_default=0, help_text="List price cache hits saved")
    # The semantic cache's part of cache_hits and saved_cost (the exact cache's is the rest).
    semantic_hits = models.BigIntegerField(default=0, db_default=0, help_text="Cache hits of the semantic cache")
    semantic_saved_cost = models.DecimalField(**ROLLUP_COST, default=0, db_default=0,
                                              help_text="List price semantic cache hits saved")
    unpriced = models.BigIntegerField(default=0, help_text="Events no price book row applied to")
    # Queue wait of the events that waited in a runtime's queue (rejected ones did not).
    queue_wait_ms_sum = models.FloatField(default=0.0, db_default=0.0)
    queue_waits = models.BigIntegerField(default=0, db_default=0, help_text="Events whose queue wait was measured")
    queue_wait_ms_max = models.FloatField(null=True, blank=True)
    # Rejections by reason (their status); the rows of status class "rejected" hold them.
    rejected_rule = models.BigIntegerField(default=0, db_default=0)
    rejected_budget = models.BigIntegerField(default=0, db_default=0)
    shed = models.BigIntegerField(default=0, db_default=0)
    e2e_hist = models.JSONField(default=dict)  # sketch bucket index -> count
    ttft_hist = models.JSONField(default=dict)

    class Meta:
        abstract = True


class Rollup(RollupSums):
    """Request events summed per bucket of started_at and (tenant, feature, model, status class)."""

    granularity = models.CharField(max_length=6, choices=Granularity.choices)
    bucket = models.DateTimeField()
    tenant = models.CharField(max_length=100)
    feature = models.CharField(max_length=100)
    model = models.CharField(max_length=200)  # model_served, or "" when none was served
    status_class = models.CharField(max_length=10)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["granularity", "bucket", "tenant", "feature", "model", "status_class"],
                                    name="one_rollup_row_per_bucket")
        ]
        indexes = [models.Index(fields=["granularity", "bucket"])]

    def __str__(self) -> str:
        return f"{self.granularity} {self.bucket:%Y-%m-%d %H:%M} {self.tenant}/{self.feature}/{self.model}"


class Marginal(models.TextChoices):
    """Which one dimension a ``MarginalRollup`` row keeps ("" keeps none: per status class only)."""

    TOTAL = "", "total"
    TENANT = "tenant", "tenant"
    FEATURE = "feature", "feature"
    MODEL = "model", "model"


class MarginalRollup(RollupSums):
    """The same sums as ``Rollup`` with all dimensions but one (or all of them) added up: per bucket,
    status class and tenant, or feature, or model, or none.

    A dashboard that filters or groups by at most one dimension — the overview, a tenant's page,
    spend by feature — reads these instead of every (tenant, feature, model) row: a month of
    overview is ~120 rows here against tens of thousands in ``Rollup``. They are written with
    ``Rollup`` from the same sums in the same transaction, so the two never disagree.
    """

    granularity = models.CharField(max_length=6, choices=Granularity.choices)
    bucket = models.DateTimeField()
    dimension = models.CharField(max_length=7, choices=Marginal.choices, blank=True)
    value = models.CharField(max_length=200, blank=True)  # the kept dimension's value; "" for the total
    status_class = models.CharField(max_length=10)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["granularity", "bucket", "dimension", "value", "status_class"],
                                    name="one_marginal_rollup_row_per_bucket")
        ]
        indexes = [models.Index(fields=["dimension", "granularity", "bucket"])]

    def __str__(self) -> str:
        kept = f"{self.dimension}={self.value}" if self.dimension else "total"
        return f"{self.granularity} {self.bucket:%Y-%m-%d %H:%M} {kept} {self.status_class}"


class DeviceUseRollup(models.Model):
    """Device time attributed to requests, summed per bucket of ``started_at``, runtime and device.

    Written by the request rollup run beside ``Rollup`` (same watermark, same lock): what idle
    capacity subtracts from the device time paid for, without reading a month of raw events.
    Requests without a device or without measured device time are not counted here."""

    granularity = models.CharField(max_length=6, choices=Granularity.choices)
    bucket = models.DateTimeField()
    runtime_id = models.CharField(max_length=100)
    device = models.CharField(max_length=100)
    requests = models.BigIntegerField(default=0)
    gpu_seconds = models.FloatField(default=0.0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["granularity", "bucket", "runtime_id", "device"],
                                               name="one_device_use_rollup_row_per_bucket")]

    def __str__(self) -> str:
        return f"{self.granularity} {self.bucket:%Y-%m-%d %H:%M} {self.runtime_id} {self.device}"


class RuntimeRollup(models.Model):
    """Runtime samples summed per bucket of ``at`` and runtime: averages are sum / samples."""

    granularity = models.CharField(max_length=6, choices=Granularity.choices)
    bucket = models.DateTimeField()
    runtime_id = models.CharField(max_length=100)
    samples = models.BigIntegerField(default=0)
    queue_depth_sum = models.BigIntegerField(default=0)
    queue_depth_max = models.BigIntegerField(default=0)
    running_sum = models.BigIntegerField(default=0)
    running_max = models.BigIntegerField(default=0)
    tokens_per_s_sum = models.FloatField(default=0.0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["granularity", "bucket", "runtime_id"],
                                               name="one_runtime_rollup_row_per_bucket")]

    def __str__(self) -> str:
        return f"{self.granularity} {self.bucket:%Y-%m-%d %H:%M} {self.runtime_id}"


class DeviceRollup(models.Model):
    """Device samples summed per bucket of ``at`` and device. A reading a driver did not report is
    left out of its sum, and the ``*_count`` beside the sum says how many were measured: a bucket
    with a count of 0 has that figure unknown, not 0. ``energy_joules`` is the growth of the device's
    energy counter between consecutive readings, each step counted in the bucket of its later
    reading; a step where the counter went down (a reset) is skipped."""

    granularity = models.CharField(max_length=6, choices=Granularity.choices)
    bucket = models.DateTimeField()
    runtime_id = models.CharField(max_length=100)
    device = models.CharField(max_length=100)
    name = models.CharField(max_length=200, null=True, blank=True)
    samples = models.BigIntegerField(default=0)
    gpu_util_sum = models.FloatField(default=0.0)
    gpu_util_count = models.BigIntegerField(default=0)
    # A double: a day of readings of a large device overflows a bigint (contracts.py, "Bounds").
    mem_used_sum = models.FloatField(default=0.0)
    mem_used_count = models.BigIntegerField(default=0)
    mem_used_max = models.BigIntegerField(null=True, blank=True)
    power_w_sum = models.FloatField(default=0.0)
    power_w_count = models.BigIntegerField(default=0)
    energy_joules = models.FloatField(default=0.0)
    energy_count = models.BigIntegerField(default=0, help_text="Counter steps measured")
    mem_total_max = models.BigIntegerField(null=True, blank=True)
    temperature_c_max = models.FloatField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["granularity", "bucket", "runtime_id", "device"],
                                               name="one_device_rollup_row_per_bucket")]

    def __str__(self) -> str:
        return f"{self.granularity} {self.bucket:%Y-%m-%d %H:%M} {self.device}"


class ClientTask(models.Model):
    """One task of a tenant, as far as its attempts have been rolled up: every attempt (event) that
    carries its ``task_id`` — a request's retries and fallbacks, a job's attempts and replays, a
    client re-sending under the same task id — whenever each arrived. Written by the request rollup
    run (same watermark, same lock), so a task whose attempts span many runs adds up across them.
    An event without a task id (an older runtime) is a task of its own, keyed by its ``request_id``
    or else its ``event_id``.

    A task *succeeded* if any attempt did (status ok). Its feature is its first attempt's; its model
    the one that answered it (the latest ok attempt's), or else the latest attempt's ("" when no model
    was served). Reads count a task in the range of its first attempt (``first_started_at``).
    """

    tenant = models.CharField(max_length=100)
    task_id = models.CharField(max_length=100)
    feature = models.CharField(max_length=100)
    model = models.CharField(max_length=200, blank=True)
    model_at = models.DateTimeField(help_text="When the attempt that named the model started")
    first_started_at = models.DateTimeField()
    last_started_at = models.DateTimeField()
    attempts = models.BigIntegerField(default=0)
    requests = models.BigIntegerField(default=0, help_text="Client requests: first attempts")
    succeeded = models.BooleanField(default=False)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    list_cost = models.DecimalField(**ROLLUP_COST, default=0)
    hardware_cost = models.DecimalField(**ROLLUP_COST, default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "task_id"], name="one_row_per_task")]
        indexes = [models.Index(fields=["first_started_at"]), models.Index(fields=["feature", "first_started_at"])]

    def __str__(self) -> str:
        outcome = "succeeded" if self.succeeded else "not succeeded"
        return f"{self.tenant}/{self.task_id}: {self.attempts} attempts, {outcome}"


class FillState(models.Model):
    """How far a periodic job has got: rollups have counted every event received up to ``watermark``."""

    name = models.CharField(max_length=100, unique=True)
    watermark = models.DateTimeField()
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.name} @ {self.watermark:%Y-%m-%d %H:%M:%S}"


class RuntimeEventCount(models.Model):
    """Per runtime, the events it recorded against the events the control plane stored, counting
    the events that carry the runtime's sequence number (``seq``: 1, 2, 3, ...). Counted by ingest
    in the transaction that stores them, so a resent event is never counted twice; kept for good,
    while raw events expire. ``telemetry.selectors.event_completeness`` reads it."""

    runtime_id = models.CharField(max_length=100, unique=True)
    recorded = models.BigIntegerField(default=0, help_text="The highest events_recorded a sample reported")
    stored = models.BigIntegerField(default=0, help_text="Events with a seq stored, each once")
    highest_stored = models.BigIntegerField(default=0, help_text="The highest seq stored")
    updated_at = models.DateTimeField(db_default=Now())

    def __str__(self) -> str:
        return f"{self.runtime_id}: {self.stored} stored, up to seq {self.highest_stored}"


class RollupQuarantine(models.Model):
    """What a rollup run left out rather than stop: raw records whose numbers are out of the
    contract's bounds (stored before ingest bounded them, or written around ingest), and rollup rows
    the database would not store. One row per run and kind, written with the run's watermark, so
    nothing is counted here twice."""

    stat = models.CharField(max_length=100, help_text="The run's FillState: requests or samples")
    source = models.CharField(max_length=100, help_text="The raw record's model, or the rollup row's")
    count = models.BigIntegerField()
    examples = models.JSONField(default=list, help_text="Ids of the first raw records, or keys of the first rows")
    reason = models.TextField()
    created_at = models.DateTimeField(db_default=Now())

    def __str__(self) -> str:
        return f"{self.stat}: {self.count} {self.source} left out"
