"""Demo traffic: tenants on different tiers, features with different prompt lengths and
burstiness, some exact repeats, all through the official ``openai`` SDK."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import openai
from tqdm import tqdm

TENANTS = (  # key, tenant, tier
    ("sk-demo-acme-premium", "acme", "premium"),
    ("sk-demo-globex-standard", "globex", "standard"),
    ("sk-demo-initech-free", "initech", "free"),
)


@dataclass(frozen=True)
class Feature:
    name: str
    prompts: tuple[str, ...]
    max_tokens: int
    burst: int  # requests sent together
    priority: str


FEATURES = (
    Feature("search", ("Give three keywords for: renewable energy storage.", "Keywords for: GPU cost per token.",
                       "Keywords for: queueing theory basics."), 16, 6, "high"),
    Feature("summaries", (
        "Summarize in one sentence: Teams serving language models find that their features fail on capacity and "
        "cost long before they fail on quality. Queues grow after lunch, latency drifts, and the bill triples "
        "before anyone can say which feature spent it.",
        "Summarize in one sentence: A budget that is enforced at the edge drifts, because replicas sync late and "
        "concurrent first requests slip past the limit.",
    ), 48, 3, "normal"),
    Feature("chat-assistant", ("What is the capital of France?", "Write a haiku about the sea.",
                               "Explain what a GPU does in two sentences.", "How do I boil an egg?"), 40, 4, "normal"),
    Feature("batch-tagging", ("Tag this ticket: printer on floor 3 is jammed again.",
                              "Tag this ticket: VPN drops every hour."), 12, 8, "low"),
)


def api_keys_setting() -> str:
    return ",".join(f"{key}:{tenant}:{tier}" for key, tenant, tier in TENANTS)


async def drive(base_url: str, *, model: str, rounds: int, seed: int = 7) -> dict[str, int]:
    """Send ``rounds`` bursts per feature, interleaved, and count outcomes by HTTP status."""
    rng = random.Random(seed)
    clients = {key: openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=300)
               for key, _, _ in TENANTS}
    plan = [(feature, rng.choice(TENANTS)) for _ in range(rounds) for feature in FEATURES]
    rng.shuffle(plan)
    outcomes: dict[str, int] = {}
    total = sum(feature.burst for feature, _ in plan)
    with tqdm(total=total, desc="demo traffic", unit="req") as bar:
        for feature, (key, _, _) in plan:
            burst = [_one(clients[key], model, feature, rng.choice(feature.prompts), rng) for _ in range(feature.burst)]
            for status in await asyncio.gather(*burst):
                outcomes[status] = outcomes.get(status, 0) + 1
                bar.update()
            await asyncio.sleep(rng.uniform(0.0, 0.5))
    for client in clients.values():
        await client.close()
    return outcomes


async def _one(client: openai.AsyncOpenAI, model: str, feature: Feature, prompt: str, rng: random.Random) -> str:
    headers = {"X-Wattson-Feature": feature.name, "X-Wattson-Priority": feature.priority}
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=feature.max_tokens,
            temperature=0.7, seed=rng.randrange(3),  # a few seeds, so some requests repeat exactly
            stream=True, stream_options={"include_usage": True}, user=f"user-{rng.randrange(20)}",
            extra_headers=headers)
        async for _ in stream:
            pass
        return "200"
    except openai.APIStatusError as exc:
        return str(exc.status_code)
    except openai.APIConnectionError:
        return "connection error"
