"""Identity spec on tiny random Llamas: compiled == eager HF, token for token."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import accelc
from accelc.runtime.sampling import SamplingParams
from _support import TINY, hf_greedy


def test_prefill_logits_equal_eager(tiny, tiny_compiled):
    ids = torch.randint(3, 250, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = tiny.model(ids).logits
    got = tiny_compiled.forward(ids)
    # fp32 with another summation order than MKL's (the native kernel's 8 or 16 lanes): ~1e-5 apart
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=3e-5)


def test_every_decode_step_logits_equal_eager(tiny, tiny_compiled):
    """Step-by-step logits through the runtime KV cache equal a full eager forward of the prefix."""
    eng = tiny_compiled.engine
    ids = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(2))
    cache = eng.new_cache(1, 4)  # small on purpose: the cache must grow
    with torch.inference_mode():
        lens = torch.tensor([12])
        logits = eng.step(cache, ids, torch.arange(12)[None], lens, torch.arange(12)[None])
        torch.testing.assert_close(logits, tiny.model(ids).logits, rtol=1e-5, atol=1e-5)
        seq = ids
        for t in range(6):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            logits = eng.step(cache, nxt, torch.tensor([[seq.shape[1] - 1]]), torch.ones(1, dtype=torch.long), torch.zeros((1, 1), dtype=torch.long))
            ref = tiny.model(seq).logits[:, -1:]
            torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert all(int(cache.lens[i]) == seq.shape[1] for i in cache.layers)


def test_greedy_tokens_equal_hf_generate(tiny, tiny_compiled):
    for seed, n in [(3, 5), (4, 17), (5, 40)]:
        ids = torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
        got = tiny_compiled.generate([ids], max_new_tokens=24)
        assert got.tokens[0] == hf_greedy(tiny.model, ids, 24)


def test_batch_of_different_lengths_equals_each_alone(tiny_compiled):
    prompts = [[5, 6, 7], list(range(10, 40)), [9]]
    batch = tiny_compiled.generate(prompts, max_new_tokens=16)
    for i, p in enumerate(prompts):
        alone = tiny_compiled.generate([p], max_new_tokens=16)
        assert batch.tokens[i] == alone.tokens[0]
        assert batch.prompt_tokens[i] == len(p)


def test_sampling_with_seed_is_reproducible_and_seed_matters(tiny_compiled):
    kw = dict(max_new_tokens=20, temperature=1.0, top_p=0.9)
    a = tiny_compiled.generate([[5, 6, 7]], seed=11, **kw).tokens
    b = tiny_compiled.generate([[5, 6, 7]], seed=11, **kw).tokens
    c = tiny_compiled.generate([[5, 6, 7]], seed=12, **kw).tokens
    assert a == b
    assert a != c


def test_eos_stops_generation(tiny, tiny_compiled):
    ids = [5, 6, 7]
    free = tiny_compiled.engine.generate([ids], max_new_tokens=12, eos=False).tokens[0]
    eos_tok = free[4]
    cm = tiny_compiled
    saved = cm.info
    object.__setattr__(saved, "eos_token_ids", (eos_tok,))
    try:
        stopped = cm.engine.generate([ids], max_new_tokens=12).tokens[0]
    finally:
        object.__setattr__(saved, "eos_token_ids", (2,))
    assert stopped == free[: free.index(eos_tok) + 1]


def test_prompt_longer_than_context_is_a_clear_error(tiny_compiled):
    with pytest.raises(accelc.AccelcError, match="exceed the model's context"):
        tiny_compiled.generate([[5] * 2040], max_new_tokens=16)


@settings(max_examples=6, deadline=None)
@given(
    layers=st.integers(1, 3),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([8, 16]),
    seq=st.integers(1, 40),
    batch=st.integers(1, 3),
)
def test_random_tiny_configs_compile_to_eager_equivalent(layers, kv_heads, group, head_dim, seq, batch):
    loaded = accelc.load_model(
        "tiny", seed=7, num_hidden_layers=layers, num_key_value_heads=kv_heads, num_attention_heads=kv_heads * group,
        head_dim=head_dim, hidden_size=kv_heads * group * head_dim, **TINY,
    )
    cm = accelc.compile(loaded, {"accelc": 1})
    ids = torch.randint(3, 250, (batch, seq), generator=torch.Generator().manual_seed(seq))
    with torch.inference_mode():
        ref = loaded.model(ids).logits
    torch.testing.assert_close(cm.forward(ids), ref, rtol=1e-4, atol=1e-4)
    # and one cached decode step after it
    eng = cm.engine
    cache = eng.new_cache(batch, seq + 1)
    with torch.inference_mode():
        eng.step(cache, ids, torch.arange(seq).expand(batch, seq), torch.full((batch,), seq), torch.zeros((batch, 1), dtype=torch.long))
        nxt = ref[:, -1].argmax(-1, keepdim=True)
        got = eng.step(cache, nxt, torch.full((batch, 1), seq), torch.ones(batch, dtype=torch.long), torch.zeros((batch, 1), dtype=torch.long))
        want = loaded.model(torch.cat([ids, nxt], 1)).logits[:, -1:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_greedy_sampling_params_validation():
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
