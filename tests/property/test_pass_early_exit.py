"""early_exit pass on tiny Llamas of drawn sizes: the draft graph's logits equal the eager model
truncated after k layers + final norm + LM head (over any rows of the head), it touches only the
caches of layers < k, the lower graph gives the same residual stream, and the tail graph fed with
that stream gives the full model's logits while writing only the caches of layers >= k."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import accelc


@st.composite
def tiny_configs(draw):
    kv = draw(st.sampled_from([1, 2]))
    heads = kv * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([8, 16]))
    return dict(
        num_hidden_layers=draw(st.integers(2, 4)),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        hidden_size=heads * head_dim,
        intermediate_size=draw(st.sampled_from([32, 64])),
        vocab_size=draw(st.sampled_from([32, 97, 259])),
        initializer_range=0.2,
    )


def eager_truncated_logits(model, ids: torch.Tensor, k: int) -> torch.Tensor:
    """(B, S, V): lm_head(norm(h_k)) with h_k the residual stream after the first k layers."""
    store = {}
    hook = model.model.layers[k - 1].register_forward_hook(lambda _m, _i, o: store.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        hook.remove()
    with torch.no_grad():
        return model.lm_head(model.model.norm(store["h"]))


@settings(max_examples=5, deadline=None)
@given(cfg=tiny_configs(), seed=st.integers(0, 3), data=st.data())
def test_draft_logits_equal_truncated_eager_model(cfg, seed, data):
    loaded = accelc.load_model("tiny", seed=seed, **cfg)
    n = cfg["num_hidden_layers"]
    k = data.draw(st.integers(1, n - 1), label="exit_layer")
    cm = accelc.compile(loaded, accelc.load_spec({"accelc": 1, "decode": {"speculative": {"draft": "early_exit", "exit_layer": k}}}))
    meta = cm.program.meta["speculative"]
    draft = cm.program.graphs["draft"]
    names = meta["inputs"]["draft"]
    assert not any(name.endswith(f"_{i}") and "cache" in name for i in range(k, n) for name in names)

    B = data.draw(st.integers(1, 2), label="batch")
    S = data.draw(st.integers(1, 9), label="seq")
    ids = torch.randint(3, cfg["vocab_size"], (B, S), generator=torch.Generator().manual_seed(seed))
    cache = cm.engine.new_cache(B, S)
    feeds = cache.inputs()
    pos = torch.arange(S).expand(B, S)
    head = getattr(cm.program.gm, meta["head_weight"])
    rows = torch.tensor(sorted(data.draw(st.sets(st.integers(0, cfg["vocab_size"] - 1), min_size=1), label="head rows")))
    with torch.no_grad():
        got, exit_h = draft(input_ids=ids, position_ids=pos, q_len=torch.full((B,), S), tree_mask=None,
                            logits_index=pos.contiguous(), draft_head_weight=head[rows].contiguous(),
                            **{n_: feeds[n_] for n_ in names if n_ in feeds})
    want = eager_truncated_logits(loaded.model, ids, k)
    torch.testing.assert_close(got, want[..., rows], atol=1e-4, rtol=1e-4)
    for layer in cache.layers:  # only the layers the draft runs write their cache
        assert int(cache.lens[layer][0]) == (S if layer < k else 0)

    lower, lower_names = cm.program.graphs["lower"], meta["inputs"]["lower"]
    tail, tail_names = cm.program.graphs["tail"], meta["inputs"]["tail"]
    fresh = cm.engine.new_cache(B, S)
    f2 = fresh.inputs()
    given = dict(input_ids=ids, position_ids=pos, q_len=torch.full((B,), S), tree_mask=None, logits_index=pos.contiguous())
    with torch.no_grad():
        h2 = lower(**{n_: v for n_, v in given.items() if n_ in lower_names}, **{n_: f2[n_] for n_ in lower_names if n_ in f2})
        torch.testing.assert_close(h2, exit_h)
        full = tail(exit_hidden=h2, **{n_: v for n_, v in given.items() if n_ in tail_names},
                    **{n_: f2[n_] for n_ in tail_names if n_ in f2})
        with torch.no_grad():
            ref = loaded.model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(full, ref, atol=1e-4, rtol=1e-4)
    assert not any(name.startswith(("k_cache_", "v_cache_")) and int(name.rsplit("_", 1)[1]) < k for name in tail_names)
    for layer in fresh.layers:  # lower + tail write every layer once
        assert int(fresh.lens[layer][0]) == S
