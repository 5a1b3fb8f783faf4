"""Token selection (FastKV TSP) and KV compression (SnapKV / PyramidKV): invariants and references."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import accelc
from accelc import ops
from accelc.passes.kv_compress import layer_keeps
from _support import TINY

PROMPTS = [list(range(3, 40)), list(range(50, 60)), [7, 8, 9] * 23]


def _spec(tsp=None, comp=None):
    s = {"accelc": 1}
    if tsp:
        s["prefill"] = {"token_selection": tsp}
    if comp:
        s["kv_cache"] = {"compression": comp}
    return s


@pytest.fixture(scope="module")
def base(tiny):
    return accelc.compile(tiny, _spec())


def ref_scores(q_win, k, n, scale, kernel, pooling):
    """Brute force: dense softmax of the window queries over the n valid keys, summed, pooled."""
    B, H, W, D = q_win.shape
    Hkv = k.shape[1]
    out = torch.full((B, Hkv, k.shape[2]), float("-inf"))
    for b in range(B):
        nb = int(n[b])
        Wb = min(W, nb)
        kk = k[b, :, :nb].repeat_interleave(H // Hkv, 0)             # (H, nb, D)
        logits = torch.einsum("hwd,hnd->hwn", q_win[b, :, W - Wb:], kk) * scale
        pos = torch.arange(nb - Wb, nb)
        logits = logits.masked_fill(torch.arange(nb)[None, None] > pos[None, :, None], float("-inf"))
        p = logits.softmax(-1).sum(1).view(Hkv, H // Hkv, nb).sum(1)  # (Hkv, nb)
        pre = p[:, : nb - Wb]
        if pre.shape[1]:
            if pooling == "max":
                pooled = F.max_pool1d(pre[:, None], kernel, 1, kernel // 2)[:, 0]
            else:
                pooled = F.avg_pool1d(pre[:, None], kernel, 1, kernel // 2)[:, 0]
            out[b, :, : nb - Wb] = pooled
        out[b, :, nb - Wb : nb] = float("inf")
    return out


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3), kv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]), W=st.integers(1, 6),
    kernel=st.sampled_from([1, 3, 5]), pooling=st.sampled_from(["max", "avg"]), keep=st.floats(0.05, 1.0),
    seed=st.integers(0, 1000), data=st.data(),
)
def test_tsp_select_keeps_top_k_of_reference_score_and_the_window(B, kv, group, W, kernel, pooling, keep, seed, data):
    g = torch.Generator().manual_seed(seed)
    S = data.draw(st.integers(1, 40))
    n = torch.tensor([data.draw(st.integers(1, S)) for _ in range(B)])
    H, D = kv * group, 8
    q = torch.randn(B, H, S, D, generator=g)
    k = torch.randn(B, kv, S + 3, D, generator=g)
    idx, count = torch.ops.accelc.tsp_select(q, k, n, 0.3, W, kernel, pooling, keep, 0)
    qw = ops.window_queries(q, n, min(W, S))
    scores = ref_scores(qw, k, n, 0.3, kernel, pooling).sum(1)
    for b in range(B):
        nb, c = int(n[b]), int(count[b])
        assert c == min(nb, math.ceil(keep * nb) + min(W, nb))  # the top fraction plus the window
        kept = idx[b, :c].tolist()
        assert kept == sorted(kept) and len(set(kept)) == c and all(0 <= i < nb for i in kept)
        assert set(range(max(0, nb - W), nb)) <= set(kept)                      # window always kept
        order = sorted(range(nb), key=lambda j: (-scores[b, j].item(), j))     # ties -> lower position
        assert set(kept) == set(order[:c])


def test_layer_keeps_pyramid_schedule_averages_to_keep_and_decreases():
    ks = layer_keeps("pyramidkv", 0.2, 30)
    assert abs(sum(ks) / 30 - 0.2) < 1e-9
    assert all(a >= b for a, b in zip(ks, ks[1:])) and ks[0] > 0.35 and ks[-1] < 0.02
    budgets = layer_keeps("pyramidkv", 256, 30)
    assert abs(sum(budgets) / 30 - 256) < 2 and budgets[0] > budgets[-1]
    assert layer_keeps("snapkv", 0.1, 5) == [0.1] * 5
    assert layer_keeps("pyramidkv", 1.0, 7) == [1.0] * 7
    capped = layer_keeps("pyramidkv", 0.8, 10)      # top layers cap at 1, the excess moves deeper
    assert max(capped) == 1.0 and abs(sum(capped) / 10 - 0.8) < 1e-9


@pytest.mark.parametrize("spec", [
    _spec(tsp={"layer": 1, "keep": 1.0}),
    _spec(tsp={"layer": 2, "keep": 4096}),
    _spec(comp={"method": "snapkv", "keep": 1.0}),
    _spec(comp={"method": "pyramidkv", "keep": 4096}),
    _spec(comp={"method": "pyramidkv", "keep": 1.0}),
    _spec(tsp={"layer": 0, "keep": 1.0}, comp={"method": "snapkv", "keep": 4096, "layers": "1-3"}),
], ids=["tsp-keep1", "tsp-budget", "snapkv-keep1", "pyramid-budget", "pyramid-keep1", "both"])
def test_keep_everything_is_identical_to_baseline(tiny, base, spec):
    cm = accelc.compile(tiny, spec)
    assert cm.generate(PROMPTS, max_new_tokens=12).tokens == base.generate(PROMPTS, max_new_tokens=12).tokens
    ids = torch.tensor([PROMPTS[0]])
    eng, beng = cm.engine, base.engine
    with torch.inference_mode():
        outs = []
        for e in (eng, beng):
            cache = e.new_cache(1, 64)
            n = ids.shape[1]
            first = e.step(cache, ids, torch.arange(n)[None], torch.tensor([n]), torch.tensor([[n - 1]]), prefill=True)
            nxt = e.step(cache, torch.tensor([[5]]), torch.tensor([[n]]), torch.ones(1, dtype=torch.long), torch.zeros((1, 1), dtype=torch.long))
            outs.append((first, nxt))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [
    _spec(tsp={"layer": 1, "keep": 0.3, "window": 4}),
    _spec(comp={"method": "snapkv", "keep": 0.25}),
    _spec(tsp={"layer": 2, "keep": 0.5}, comp={"method": "pyramidkv", "keep": 12, "window": 4}),
], ids=["tsp", "snapkv", "tsp+pyramid"])
def test_batch_equals_each_prompt_alone_and_memory_shrinks(tiny, base, spec):
    cm = accelc.compile(tiny, spec)
    batch = cm.generate(PROMPTS, max_new_tokens=10)
    for i, p in enumerate(PROMPTS):
        assert cm.generate([p], max_new_tokens=10).tokens[0] == batch.tokens[i]
    full = base.generate(PROMPTS, max_new_tokens=10)
    assert batch.stats["kv_cache_bytes_after_prefill"] < full.stats["kv_cache_bytes_after_prefill"]


def test_min_keep_floors_short_prompts_only(tiny):
    """min_keep: at least that many top entries (+ the window) per layer, for TSP and compression."""
    spec = _spec(tsp={"layer": 1, "keep": 0.1, "min_keep": 30, "window": 4},
                 comp={"method": "snapkv", "keep": 0.1, "min_keep": 20, "window": 4})
    cm = accelc.compile(tiny, spec)
    for n, propagated, cached in ((100, 34, 24), (400, 44, 44)):
        cache = cm.engine.new_cache(1, n)
        ids = torch.tensor([[3 + (i % 200) for i in range(n)]])
        cm.engine.step(cache, ids, torch.arange(n)[None], torch.tensor([n]), torch.tensor([[n - 1]]), prefill=True)
        lens = [int(cache.lens[i]) for i in cache.layers]
        # layers <= 1: 10% of n (at least 20) + 4 cached; layers > 1 hold the propagated 10% (at least 30) + 4,
        # compressed to at most 10% of the prompt (at least 20) + 4
        assert lens[:2] == [cached, cached]
        assert all(l == min(propagated, cached) for l in lens[2:]), (n, lens)


def test_kv_memory_shrinks_in_proportion_to_keep(tiny, base):
    prompt = [list(range(3, 203))]
    full = base.generate(prompt, max_new_tokens=1).stats["kv_cache_bytes_after_prefill"]
    for keep in (0.5, 0.25, 0.1):
        cm = accelc.compile(tiny, _spec(comp={"method": "snapkv", "keep": keep}))
        got = cm.generate(prompt, max_new_tokens=1).stats["kv_cache_bytes_after_prefill"]
        assert got == pytest.approx(full * (math.ceil(keep * 200) + 8) / 200, rel=1e-6)  # + the default window of 8


def _eager_tsp_last_logits(model, ids, L, keep, window, kernel, pooling):
    """Reference TSP with HF's own modules: layers <= L on all tokens, select, layers > L on the kept ones."""
    m = model.model
    n = ids.shape[1]
    pos = torch.arange(n)[None]
    h = m.embed_tokens(ids)
    cos, sin = m.rotary_emb(h, pos)
    for i in range(L):
        h = m.layers[i](h, position_embeddings=(cos, sin), attention_mask=None)
    layer = m.layers[L]
    x = layer.input_layernorm(h)
    att = layer.self_attn
    D = att.head_dim
    q = att.q_proj(x).view(1, n, -1, D).transpose(1, 2)
    k = att.k_proj(x).view(1, n, -1, D).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    h = layer(h, position_embeddings=(cos, sin), attention_mask=None)
    W = min(window, n)
    scores = ref_scores(q[:, :, n - W:], k, torch.tensor([n]), att.scaling, kernel, pooling).sum(1)[0, :n]
    c = min(n, math.ceil(keep * n) + W)
    kept = sorted(sorted(range(n), key=lambda j: (-scores[j].item(), j))[:c])
    idx = torch.tensor(kept)
    h, cos, sin = h[:, idx], cos[:, idx], sin[:, idx]
    for i in range(L + 1, len(m.layers)):
        h = m.layers[i](h, position_embeddings=(cos, sin), attention_mask=None)
    return model.lm_head(m.norm(h))[:, -1], kept


def test_tsp_prefill_equals_eager_reference_built_from_hf_modules(tiny):
    cm = accelc.compile(tiny, _spec(tsp={"layer": 1, "keep": 0.3, "window": 4, "kernel": 3, "pooling": "avg"}))
    ids = torch.tensor([PROMPTS[0]])
    n = ids.shape[1]
    with torch.inference_mode():
        want, kept = _eager_tsp_last_logits(tiny.model, ids, 1, 0.3, 4, 3, "avg")
        cache = cm.engine.new_cache(1, n)
        got = cm.engine.step(cache, ids, torch.arange(n)[None], torch.tensor([n]), torch.tensor([[n - 1]]), prefill=True)
    torch.testing.assert_close(got[:, -1], want, rtol=1e-4, atol=1e-4)
    # layers <= 1 cached every token, layers > 1 only the kept ones
    assert [int(cache.lens[i]) for i in cache.layers] == [n, n, len(kept), len(kept)]


@settings(max_examples=5, deadline=None)
@given(layers=st.integers(2, 4), kv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]),
       L=st.integers(0, 2), keep=st.sampled_from([0.2, 0.5, 16]), method=st.sampled_from(["snapkv", "pyramidkv"]))
def test_passes_on_drawn_tiny_models_run_lint_and_keep_batch_equivalence(layers, kv, group, L, keep, method):
    L = min(L, layers - 2)
    loaded = accelc.load_model("tiny", seed=3, num_hidden_layers=layers, num_key_value_heads=kv,
                               num_attention_heads=kv * group, hidden_size=kv * group * 16, **TINY)
    cm = accelc.compile(loaded, _spec(tsp={"layer": L, "keep": keep, "window": 3}, comp={"method": method, "keep": keep, "window": 3}))
    names = [r.name for r in cm.program.history]
    assert "tsp" in names and "kv_compress" in names
    for gm in cm.program.graphs.values():
        gm.graph.lint()
    prompts = [list(range(3, 30)), list(range(40, 49))]
    batch = cm.generate(prompts, max_new_tokens=5)
    for i, p in enumerate(prompts):
        assert cm.generate([p], max_new_tokens=5).tokens[0] == batch.tokens[i]
