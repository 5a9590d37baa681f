"""The runtime serves SmolLM2-135M-Instruct's real weights through its API."""

from __future__ import annotations

import openai
import pytest

from inference.engine.models import LoadedModel
from tests.inference.live import ACME, serve, tiny_config


@pytest.mark.real_model
def test_smollm2_answers_a_chat_completion_through_the_api(smollm2: LoadedModel) -> None:
    with serve(tiny_config(models=("smollm2",), max_model_len=2048), preloaded=(smollm2,)) as live:
        client = openai.OpenAI(base_url=live.base_url + "/v1", api_key=ACME, max_retries=0)
        reply = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0)
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=24, temperature=0, stream=True)
            if chunk.choices)
        (event, _) = live.wait_for_events(2)

    answer = reply.choices[0].message.content or ""
    assert "Paris" in answer
    assert streamed == answer
    assert reply.choices[0].finish_reason == "stop", "SmolLM2 ends its answer with <|im_end|>"
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 24
    assert event.model_served == "smollm2" and event.completion_tokens == reply.usage.completion_tokens
    assert event.gpu_seconds is not None and event.gpu_seconds > 0
