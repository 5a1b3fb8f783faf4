"""Every supported architecture, as a tiny random model from its transformers config class:
capture + identity spec == eager HF (logits and greedy tokens, batches right-padded by the
runtime), feature passes keep their invariants, and unsupported ones are clear errors.

Gemma 3's tiny model mixes sliding-window layers (window 8) with a global layer, and the prompts
(up to 30 tokens + 16 new) run far past the window, so prefill, decode, batches, token selection,
KV compression and speculative trees are all checked against HF's windowed attention.  Mistral
and Qwen2 with sliding windows narrower than the context are checked the same way.
"""
from __future__ import annotations

import functools

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import accelc
from accelc.capture import attention_windows
from accelc.models import SUPPORTED_ARCHITECTURES
from _support import hf_greedy

COMMON = dict(
    vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
    pad_token_id=0, initializer_range=0.2, tie_word_embeddings=False,
)
# Gemma 3: sliding (window 8) / global / sliding layers, each type with its own RoPE base (10k / 1M
# by default), an attention scale from query_pre_attn_scalar (24, not head_dim), final logit
# soft-capping (10, below the largest logits so that it bites), tied embeddings.
GEMMA3 = dict(
    COMMON, tie_word_embeddings=True, sliding_window=8, query_pre_attn_scalar=24, final_logit_softcapping=10.0,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
)


def _gemma3(**overrides) -> Gemma3ForCausalLM:
    """A tiny Gemma 3 whose (1 + w) RMSNorm weights are drawn from N(0, 2): HF initialises them to 0,
    and then the random model only echoes its input through the tied, sqrt(hidden)-scaled embeddings."""
    model = Gemma3ForCausalLM(Gemma3TextConfig(**{**GEMMA3, **overrides}))
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.normal_(0.0, 2.0)
    return model


ARCHS = {
    "gemma3_text": _gemma3,
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),  # q/k/v projections with bias
    # a window as long as the context hides nothing: full attention
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=COMMON["max_position_embeddings"])),
}
PROMPTS = [[5, 6, 7], list(range(10, 40)), [9] * 2 + list(range(100, 117))]
# The tiny Gemma's large norm weights amplify rounding: HF's own fp32 logits (up to ~10) differ from
# its fp64 logits by 1e-4, and accelc's fp32 logits are no farther from fp64 than HF's are.
LOGIT_TOL = {"gemma3_text": 2e-4}


def _build(make) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make()
    return model.eval().requires_grad_(False)


@functools.cache
def built(name: str) -> torch.nn.Module:
    """The tiny model of ``name`` in ARCHS, built once (accelc captures a model once per process)."""
    return _build(ARCHS[name])


def full_layer(model, at_least: int) -> int:
    """The first full-attention layer >= ``at_least`` (token selection ranks tokens there)."""
    windows = attention_windows(model.config)
    return next(l for l in range(at_least, len(windows)) if windows[l] is None)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request):
    """(name, eager model, identity-compiled model) per supported architecture."""
    model = built(request.param)
    return request.param, model, accelc.compile(model, {"accelc": 1})


def test_the_tested_architectures_are_exactly_the_supported_ones():
    assert set(ARCHS) == set(SUPPORTED_ARCHITECTURES)


def test_identity_logits_equal_eager(arch):
    name, model, cm = arch
    assert cm.report["architecture"] == name
    ids = torch.randint(3, 250, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(ids).logits
    tol = LOGIT_TOL.get(name, 1e-5)
    torch.testing.assert_close(cm.forward(ids), ref, rtol=tol, atol=tol)


def test_identity_greedy_tokens_equal_hf_generate_alone_and_in_a_batch(arch):
    _, model, cm = arch
    want = [hf_greedy(model, p, 16) for p in PROMPTS]
    assert cm.generate([PROMPTS[1]], max_new_tokens=16).tokens[0] == want[1]
    assert cm.generate(PROMPTS, max_new_tokens=16).tokens == want


def test_every_linear_is_packed_biases_included(arch):
    name, _, cm = arch
    linears = [n for n in cm.program.gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default]
    assert not linears
    notes = " ".join(next(r for r in cm.program.history if r.name == "pack_linear").notes)
    biased = 1 if name == "qwen2" else 0
    assert f"{3 * biased} packed groups carry a fused bias" in notes  # one q/k/v group per layer


def test_keep_everything_features_equal_identity(arch):
    _, model, cm = arch
    spec = {"accelc": 1, "prefill": {"token_selection": {"layer": full_layer(model, 0), "keep": 1.0, "window": 4}},
            "kv_cache": {"compression": {"method": "snapkv", "keep": 1.0, "window": 4}}}
    full = accelc.compile(model, spec)
    assert full.generate(PROMPTS, max_new_tokens=12).tokens == cm.generate(PROMPTS, max_new_tokens=12).tokens


def test_lossy_features_batch_equals_each_prompt_alone(arch):
    _, model, _ = arch
    spec = {"accelc": 1, "prefill": {"token_selection": {"layer": full_layer(model, 1), "keep": 0.5, "window": 4}},
            "kv_cache": {"compression": {"method": "pyramidkv", "keep": 0.5, "window": 4}}}
    lossy = accelc.compile(model, spec)
    assert {r.name for r in lossy.program.history if r.matches} >= {"tsp", "kv_compress"}
    batch = lossy.generate(PROMPTS, max_new_tokens=10).tokens
    assert batch == [lossy.generate([p], max_new_tokens=10).tokens[0] for p in PROMPTS]


# ------------------------------------------------------------------------------- sliding windows
def _tiny(cls_cfg, cls_model, **kw):
    return _build(lambda: cls_model(cls_cfg(**{**COMMON, **kw})))


@pytest.fixture(scope="module")
def gemma3():
    """The tiny Gemma 3 and its identity compilation."""
    model = built("gemma3_text")
    return model, accelc.compile(model, {"accelc": 1})


def test_gemma3_window_changes_the_tokens():
    """The identity tests above check the window: without it HF generates other tokens."""
    windowed = built("gemma3_text")
    unwindowed = _build(lambda: _gemma3(sliding_window=COMMON["max_position_embeddings"]))
    assert [hf_greedy(windowed, p, 16) for p in PROMPTS] != [hf_greedy(unwindowed, p, 16) for p in PROMPTS]


def test_gemma3_report_names_the_sliding_layers(gemma3):
    _, cm = gemma3
    lift = next(r for r in cm.program.history if r.name == "lift_attention")
    assert "sliding-window layers [0, 2] (window 8)" in lift.notes
    assert cm.program.meta["kv_cache"]["windows"] == {0: 8, 2: 8}
    assert {"k_pos_0", "k_pos_2"} <= set(cm.program.inputs) and "k_pos_1" not in cm.program.inputs


@pytest.mark.parametrize("draft", [{"draft": "prompt_lookup", "ngram_max": 3, "ngram_min": 1},
                                   {"draft": "token_recycling", "successors": 4, "tree_width": 4},
                                   {"draft": "early_exit", "exit_layer": 2, "exit_head": "plain"}],
                         ids=["chain", "tree", "early_exit"])
def test_gemma3_speculative_verification_respects_the_window(gemma3, draft):
    """T=0 speculative decoding (a chain, a tree whose accepted path is moved into place, drafts of
    a graph cut after layer 2) gives HF's greedy tokens: every query sees only its window, by position."""
    model, _ = gemma3
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6], list(range(10, 40))]
    spec = {"accelc": 1, "decode": {"speculative": {**draft, "gamma": 4, "gamma_max": 4, "verify": "token"}}}
    out = accelc.compile(model, spec).engine.generate(prompts, max_new_tokens=20, eos=False)
    assert out.tokens == [hf_greedy(model, p, 20, eos=False) for p in prompts]


def test_gemma3_kv_budget_covering_the_window_is_lossless_on_sliding_layers(gemma3):
    """SnapKV keeping 8 entries (>= window - 1) on the sliding layers only: the entries their
    later queries can still reach rank first, the compacted slots keep their positions, and the
    tokens equal the identity's although most of the prompt's KV is gone."""
    model, cm = gemma3
    spec = {"accelc": 1, "kv_cache": {"compression": {"method": "snapkv", "keep": 8, "window": 4, "layers": [0, 2]}}}
    small = accelc.compile(model, spec)
    res = small.generate(PROMPTS, max_new_tokens=16)
    assert res.tokens == cm.generate(PROMPTS, max_new_tokens=16).tokens
    assert res.stats["kv_cache_bytes_after_prefill"] < cm.generate(PROMPTS, max_new_tokens=16).stats["kv_cache_bytes_after_prefill"]


def test_token_selection_at_a_sliding_layer_is_refused(gemma3):
    model, _ = gemma3
    spec = {"accelc": 1, "prefill": {"token_selection": {"layer": 0, "keep": 0.5}}}
    with pytest.raises(accelc.AccelcError, match=r"token_selection.layer: layer 0 attends through a sliding window of 8 tokens.*"
                                                 r"choose a full-attention layer: 1"):
        accelc.compile(model, spec)


def test_sparse_attention_on_sliding_layers_is_refused(gemma3):
    model, _ = gemma3
    spec = {"accelc": 1, "attention": {"sparse": [{"method": "streaming", "sink": 2, "local": 4, "layers": "1-2"}]}}
    with pytest.raises(accelc.AccelcError, match=r"layers 2 attend through a sliding window \(attention.sparse\[0\] asks for them\)"
                                                 r".*full-attention layers only: 1"):
        accelc.compile(model, spec)


@pytest.mark.parametrize("make", [
    lambda: _tiny(MistralConfig, MistralForCausalLM, sliding_window=8),
    lambda: _tiny(Qwen2Config, Qwen2ForCausalLM, use_sliding_window=True, sliding_window=8, max_window_layers=1),
], ids=["mistral_all_layers", "qwen2_from_max_window_layers"])
def test_sliding_windows_of_mistral_and_qwen2_equal_eager(make):
    model = make()
    assert any(w == 8 for w in attention_windows(model.config))
    cm = accelc.compile(model, {"accelc": 1})
    ids = torch.randint(3, 250, (2, 23), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():  # both fp32 results lie ~1e-5 from the fp64 logits (up to ~7)
        torch.testing.assert_close(cm.forward(ids), model(ids).logits, rtol=3e-5, atol=3e-5)
    assert cm.generate(PROMPTS, max_new_tokens=16).tokens == [hf_greedy(model, p, 16) for p in PROMPTS]


def test_gemma3_loads_from_a_hf_directory(tmp_path):
    from accelc.models import ByteTokenizer

    model = built("gemma3_text")
    model.save_pretrained(tmp_path)
    ByteTokenizer(259).save_pretrained(tmp_path)
    loaded = accelc.load_model(str(tmp_path))
    assert isinstance(loaded.model, Gemma3ForCausalLM) and loaded.config.layer_types == GEMMA3["layer_types"]
    ids = torch.tensor([PROMPTS[1]])
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)


# ------------------------------------------------------------------------------- unsupported
def test_unsupported_architecture_lists_the_supported_ones():
    gpt2 = _build(lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)))
    with pytest.raises(accelc.AccelcError,
                       match=r"architecture 'gpt2' is not supported \(supported: gemma3_text, llama, mistral, qwen2\)"):
        accelc.compile(gpt2, {"accelc": 1})


def test_soft_capped_attention_logits_are_refused():
    capped = _build(lambda: _gemma3(attn_logit_softcapping=50.0))
    with pytest.raises(accelc.AccelcError, match=r"attention logits are soft-capped \(attn_logit_softcapping=50.0\)"):
        accelc.compile(capped, {"accelc": 1})
