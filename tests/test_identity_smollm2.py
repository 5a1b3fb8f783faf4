"""Identity spec on the bundled SmolLM2-135M-Instruct: compiled == eager HF, token for token."""
from __future__ import annotations

import pytest
import torch

from _support import hf_greedy

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "List three facts about the Moon and explain why it has phases, in two sentences.",
]


@pytest.fixture(scope="module")
def chat_ids(smollm2_compiled):
    return smollm2_compiled.engine.encode(PROMPTS, chat=True)


def test_prefill_and_every_decode_step_logits_equal_hf(smollm2, smollm2_compiled, chat_ids):
    ids = chat_ids[1]
    t = torch.tensor([ids])
    n = 12
    with torch.inference_mode():
        hf = smollm2.model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True, pad_token_id=2)
    eng = smollm2_compiled.engine
    cache = eng.new_cache(1, len(ids) + n)
    L = len(ids)
    with torch.inference_mode():
        logits = eng.step(cache, t, torch.arange(L)[None], torch.tensor([L]), torch.tensor([[L - 1]]))
        for step in range(n):
            ref = hf.logits[step]
            torch.testing.assert_close(logits[:, -1], ref, rtol=0, atol=2e-3)
            tok = hf.sequences[:, L + step : L + step + 1]
            logits = eng.step(cache, tok, torch.tensor([[L + step]]), torch.ones(1, dtype=torch.long), torch.zeros((1, 1), dtype=torch.long))


def test_greedy_64_tokens_equal_hf_generate(smollm2, smollm2_compiled, chat_ids):
    for ids in chat_ids:
        got = smollm2_compiled.generate([ids], max_new_tokens=64)
        assert got.tokens[0] == hf_greedy(smollm2.model, ids, 64)


def test_batch_of_three_equals_each_alone(smollm2_compiled, chat_ids):
    assert len({len(p) for p in chat_ids}) == 3  # different lengths
    batch = smollm2_compiled.generate(chat_ids, max_new_tokens=24)
    for i, ids in enumerate(chat_ids):
        alone = smollm2_compiled.generate([ids], max_new_tokens=24)
        assert batch.tokens[i] == alone.tokens[0]
        assert batch.texts[i] == alone.texts[0]


def test_chat_answer_is_sensible(smollm2_compiled):
    res = smollm2_compiled.generate(["What is the capital of France?"], chat=True, max_new_tokens=16)
    assert "Paris" in res.texts[0]
    assert res.stats["ttft_s"] > 0 and res.stats["kv_cache_bytes"] > 0
