"""Demo traffic through the official ``openai`` SDK: three tenants on different tiers, each with
its own features and rhythm, running at the same time so their requests share the engine's batches.

Features differ in prompt length, completion length, burst size, priority and whether they
stream. Some waves repeat an exact request (same prompt, temperature 0), which the runtime's exact
cache answers again; the FAQ feature asks a few questions in several phrasings (greedy), which the
semantic cache the demo enables for it answers from the first phrasing's answer.
Every request names its task (``X-Wattson-Task``), and a client re-sends a request the runtime
refused for load or budget once, under the same task, so the pages show tasks of two attempts and
the waste of the ones that never succeeded. Halfway through its waves acme's ``summaries`` prompt
grows by two paragraphs, the change a cost regression check looks for (it needs a day of
baseline before it can flag one, so a short demo shows the rise on the tokens-per-request chart).
The trial tenant ``initech`` has a hard token budget; after the plan, unless its last wave was
refused whole, initech keeps asking until the runtime refuses a whole wave with 429.

Meanwhile a fourth tenant, ``umbrella``, floods the queue: its bulk import keeps ``FLOOD_BACKLOG``
requests outstanding (more than the runtime's running slots) for as long as the others send. Fair
share (VTC) keeps the others served; the tenants page's fairness view shows umbrella with most of the
demand and the others still getting their share of the service.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field

import openai
from tqdm import tqdm

TRIP_TENANT = "initech"
MAX_TRIP_REQUESTS = 60
RESENT_STATUSES = (429, 503)  # refused for budget, throttle or load: a client tries once more
GROWTH = ("Context: the reader is an engineer on the platform team who owns the inference budget and "
          "reports spend to finance every month, by product feature and by tenant.\n\n"
          "Style: keep the sentence plain, name the cause before the effect, and leave out examples, "
          "hedges and any numbers that the text itself does not give.\n\n")
FLOOD_TENANT = "umbrella"
FLOOD_BACKLOG = 16  # requests the flooder keeps outstanding: twice the demo runtime's running slots


@dataclass(frozen=True)
class Feature:
    name: str
    prompts: tuple[str, ...]
    max_tokens: int
    burst: int  # requests sent together
    priority: str
    stream: bool
    greedy: bool = False  # temperature 0 on every request: the same question gets the same answer


SEARCH = Feature("search", ("Give three keywords for: renewable energy storage.", "Keywords for: GPU cost per token.",
                            "Keywords for: queueing theory basics.", "Keywords for: solar panels on roofs."),
                 12, 5, "high", stream=False)
SUMMARIES = Feature("summaries", (
    "Summarize in one sentence: Teams serving language models find that their features fail on capacity and "
    "cost long before they fail on quality. Queues grow after lunch, latency drifts, and the bill triples "
    "before anyone can say which feature spent it.",
    "Summarize in one sentence: A budget that is enforced at the edge drifts, because replicas sync late and "
    "concurrent first requests slip past the limit. Enforcing it with reservations against a grant keeps "
    "every replica under the limit without a shared clock.",
), 32, 2, "normal", stream=True)
CHAT = Feature("chat-assistant", ("What is the capital of France?", "Write a haiku about the sea.",
                                  "Explain what a GPU does in two sentences.", "How do I boil an egg?"),
               24, 3, "normal", stream=True)
TAGGING = Feature("batch-tagging", ("Tag this ticket: printer on floor 3 is jammed again.",
                                    "Tag this ticket: VPN drops every hour.",
                                    "Tag this ticket: cannot log in after the password change."),
                  6, 8, "low", stream=False)


# Questions customers ask in different words, one group a wave; the last two groups only look like
# the first two (other intents: the semantic cache must not answer them with the first two's answers).
FAQ_GROUPS = (
    ("How do I reset my password?", "How can I reset my password?", "What are the steps to reset my password?"),
    ("How do I cancel my subscription?", "How can I cancel my subscription?", "What's the way to end my subscription?"),
    ("How long does shipping take?", "How many days does delivery take?", "What is the usual shipping time?"),
    ("How do I delete my account?", "How can I delete my account?"),
    ("How do I pause my subscription?", "How can I pause my subscription?"),
)
FAQ = Feature("faq", tuple(q for group in FAQ_GROUPS for q in group), 24, 3, "normal", stream=False, greedy=True)


@dataclass(frozen=True)
class Tenant:
    key: str
    name: str
    tier: str
    features: tuple[Feature, ...]
    pause_s: tuple[float, float]  # idle time between waves: the tenant's rhythm


BULK_IMPORT = Feature("bulk-import", ("Extract the product name: 'Acme anvil, 20 kg, black, ships in 3 days.'",
                                       "Extract the product name: 'Globex hover board, blue, no wheels.'"),
                      16, FLOOD_BACKLOG, "normal", stream=False)
TENANTS = (
    Tenant("sk-demo-acme-premium", "acme", "premium", (SEARCH, SUMMARIES, CHAT, FAQ, FAQ), (0.2, 1.0)),
    Tenant("sk-demo-globex-standard", "globex", "standard", (SEARCH, TAGGING, CHAT, FAQ), (1.0, 3.0)),
    Tenant("sk-demo-initech-free", TRIP_TENANT, "free", (CHAT, SUMMARIES), (0.5, 1.5)),
)
FLOODER = Tenant("sk-demo-umbrella-standard", FLOOD_TENANT, "standard", (BULK_IMPORT,), (0.0, 0.0))


def api_keys_setting() -> str:
    return ",".join(f"{t.key}:{t.name}:{t.tier}" for t in (*TENANTS, FLOODER))


@dataclass
class Outcomes:
    """What the clients saw, by outcome (``200``, ``429 rejected_budget``, ``503 shed`` …)."""

    counts: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    streamed: int = 0
    repeats: int = 0

    @property
    def sent(self) -> int:
        return sum(self.counts.values())

    @property
    def budget_rejections(self) -> int:
        return self.counts["429 rejected_budget"]


@dataclass(frozen=True)
class Wave:
    tenant: Tenant
    feature: Feature
    size: int
    repeat: bool  # every request of the wave is the same exact request
    pause_s: float
    # The feature's prompt carries two more paragraphs: summaries, second half, all but the trial tenant
    # (whose longer worst case would be refused before its budget is spent).
    grown: bool = False


def plan(rounds: int, rng: random.Random) -> dict[str, list[Wave]]:
    """Each tenant's waves: ``rounds`` passes over its features in a shuffled order, bursts of the
    feature's size give or take one, about a quarter of them exact repeats."""
    waves: dict[str, list[Wave]] = {}
    for tenant in TENANTS:
        mine = [feature for _ in range(rounds) for feature in tenant.features]
        rng.shuffle(mine)
        waves[tenant.name] = [
            Wave(tenant, feature, max(1, feature.burst + rng.randint(-1, 1)), rng.random() < 0.25,
                 rng.uniform(*tenant.pause_s),
                 grown=feature is SUMMARIES and tenant.name != TRIP_TENANT and i >= len(mine) // 2)
            for i, feature in enumerate(mine)]
    return waves


async def drive(base_url: str, *, model: str, rounds: int, seed: int = 7) -> Outcomes:
    """Send every tenant's waves at once, then make sure the trial tenant's budget trips."""
    rng = random.Random(seed)
    waves = plan(rounds, rng)
    outcomes = Outcomes()
    clients = {t.name: openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=t.key, max_retries=0, timeout=300)
               for t in (*TENANTS, FLOODER)}
    total = sum(w.size for ws in waves.values() for w in ws)
    try:
        with tqdm(total=total, desc="demo traffic", unit="req", dynamic_ncols=True) as bar:
            trip_refused = False  # the trial tenant's last wave was refused whole: its budget is spent

            async def tenant_loop(tenant: Tenant) -> None:
                nonlocal trip_refused
                local = random.Random(f"{seed}-{tenant.name}")
                for wave in waves[tenant.name]:
                    labels = await _wave(clients[tenant.name], model, wave, local, outcomes, bar)
                    if tenant.name == TRIP_TENANT:
                        trip_refused = all(label == "429 rejected_budget" for label in labels)
                    await asyncio.sleep(wave.pause_s)

            others_done = asyncio.Event()

            async def flood_worker(worker: int) -> None:
                local = random.Random(f"{seed}-{FLOOD_TENANT}-{worker}")
                while not others_done.is_set():
                    bar.total += 1
                    label = await _one(clients[FLOOD_TENANT], model, BULK_IMPORT, local.choice(BULK_IMPORT.prompts),
                                       False, local.randrange(1_000_000), f"{FLOOD_TENANT}-import",
                                       f"{FLOOD_TENANT}-import-{local.randrange(10**9):09d}", outcomes)
                    outcomes.counts[label] += 1
                    bar.update()

            flood = [asyncio.create_task(flood_worker(i)) for i in range(FLOOD_BACKLOG)]
            try:
                await asyncio.gather(*(tenant_loop(t) for t in TENANTS))
            finally:
                others_done.set()  # each flood worker stops after its request in flight
                await asyncio.gather(*flood)
            trip = next(t for t in TENANTS if t.name == TRIP_TENANT)
            local = random.Random(f"{seed}-trip")
            extra = 0
            while not trip_refused and extra < MAX_TRIP_REQUESTS:
                bar.set_description(f"{TRIP_TENANT} until its budget trips")
                wave = Wave(trip, CHAT, CHAT.burst, False, 0.0)
                bar.total += wave.size
                extra += wave.size
                labels = await _wave(clients[trip.name], model, wave, local, outcomes, bar)
                trip_refused = all(label == "429 rejected_budget" for label in labels)
    finally:
        for client in clients.values():
            await client.close()
    return outcomes


async def _wave(client: openai.AsyncOpenAI, model: str, wave: Wave, rng: random.Random, outcomes: Outcomes,
                bar: tqdm) -> list[str]:
    """Send one wave; return each request's outcome. A wave of one repeated request, or of one FAQ
    question in several phrasings, sends its first request alone and the rest together once it is
    answered: the first asker pays for the answer, which the caches then serve to the others."""
    if wave.feature.greedy:
        group = rng.choice(FAQ_GROUPS)
        prompts = [group[i % len(group)] for i in range(wave.size)]
    else:
        prompt = wave.feature.prompts[0] if wave.repeat else None
        prompts = [prompt or rng.choice(wave.feature.prompts) for _ in range(wave.size)]
    growth = GROWTH if wave.grown else ""
    tasks = [_task(client, model, wave.feature, growth + prompt, wave.repeat, rng.randrange(1_000_000),
                   f"{wave.tenant.name}-user-{rng.randrange(12)}",
                   f"{wave.tenant.name}-{wave.feature.name}-{rng.randrange(10**9):09d}", outcomes, bar)
             for prompt in prompts]
    stages = [tasks[:1], tasks[1:]] if wave.repeat or wave.feature.greedy else [tasks]
    labels = []
    for stage in stages:
        for outcome in asyncio.as_completed(stage):
            label = await outcome
            labels.append(label)
            bar.set_postfix({"429 budget": outcomes.budget_rejections}, refresh=False)
    return labels


async def _task(client: openai.AsyncOpenAI, model: str, feature: Feature, prompt: str, repeat: bool, seed: int,
                user: str, task: str, outcomes: Outcomes, bar: tqdm) -> str:
    """One task: a request, and once more under the same task if it was refused for budget or load.
    Every request sent is counted; the task's outcome is its last request's."""
    label = await _one(client, model, feature, prompt, repeat, seed, user, task, outcomes)
    outcomes.counts[label] += 1
    bar.update()
    if label.split(" ")[0] in {str(status) for status in RESENT_STATUSES}:
        bar.total += 1
        await asyncio.sleep(0.2)
        label = await _one(client, model, feature, prompt, repeat, seed, user, task, outcomes)
        outcomes.counts[label] += 1
        bar.update()
    return label


async def _one(client: openai.AsyncOpenAI, model: str, feature: Feature, prompt: str, repeat: bool, seed: int,
               user: str, task: str, outcomes: Outcomes) -> str:
    headers = {"X-Wattson-Feature": feature.name, "X-Wattson-Priority": feature.priority, "X-Wattson-Task": task}
    if feature.greedy:
        sampling: dict[str, float | int] = {"temperature": 0.0}
    else:
        sampling = {"temperature": 0.0, "seed": 0} if repeat else {"temperature": 0.7, "seed": seed}
    messages = [{"role": "user", "content": prompt}]
    try:
        if feature.stream:
            stream = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=feature.max_tokens, stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True}, user=user, extra_headers=headers, **sampling)
            usage = None
            async for chunk in stream:
                usage = chunk.usage or usage
            outcomes.streamed += 1
        else:
            response = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=feature.max_tokens,  # type: ignore[arg-type]
                user=user, extra_headers=headers, **sampling)
            usage = response.usage
    except openai.APIStatusError as exc:
        return f"{exc.status_code} {_error_code(exc)}".strip()
    except openai.APIConnectionError:
        return "connection error"
    if usage is not None:
        outcomes.prompt_tokens += usage.prompt_tokens
        outcomes.completion_tokens += usage.completion_tokens
    outcomes.repeats += repeat
    return "200"


def _error_code(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    return str(error.get("code") or "") if isinstance(error, dict) else ""
