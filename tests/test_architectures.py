"""Every supported architecture, as a tiny random model from its transformers config class:
capture + identity spec == eager HF (logits and greedy tokens, batches right-padded by the
runtime), feature passes keep their invariants, and unsupported ones are clear errors.

Gemma 3 is unsupported: its sliding-window layers (every 5 of 6, window 512-1024 in the released
checkpoints) would need a windowed attention op; accelc's ops attend over the whole context.
"""
from __future__ import annotations

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
from accelc.models import SUPPORTED_ARCHITECTURES
from _support import hf_greedy

COMMON = dict(
    vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
    pad_token_id=0, initializer_range=0.2, tie_word_embeddings=False,
)
ARCHS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),  # q/k/v projections with bias
    # a window as long as the context hides nothing: full attention
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=COMMON["max_position_embeddings"])),
}
PROMPTS = [[5, 6, 7], list(range(10, 40)), [9] * 2 + list(range(100, 117))]


def _build(make) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make()
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request):
    """(name, eager model, identity-compiled model) per supported architecture."""
    model = _build(ARCHS[request.param])
    return request.param, model, accelc.compile(model, {"accelc": 1})


def test_the_tested_architectures_are_exactly_the_supported_ones():
    assert set(ARCHS) == set(SUPPORTED_ARCHITECTURES)


def test_identity_logits_equal_eager(arch):
    name, model, cm = arch
    assert cm.report["architecture"] == name
    ids = torch.randint(3, 250, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(ids).logits
    torch.testing.assert_close(cm.forward(ids), ref, rtol=1e-5, atol=1e-5)


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
    spec = {"accelc": 1, "prefill": {"token_selection": {"layer": 0, "keep": 1.0, "window": 4}},
            "kv_cache": {"compression": {"method": "snapkv", "keep": 1.0, "window": 4}}}
    full = accelc.compile(model, spec)
    assert full.generate(PROMPTS, max_new_tokens=12).tokens == cm.generate(PROMPTS, max_new_tokens=12).tokens


def test_lossy_features_batch_equals_each_prompt_alone(arch):
    _, model, _ = arch
    spec = {"accelc": 1, "prefill": {"token_selection": {"layer": 1, "keep": 0.5, "window": 4}},
            "kv_cache": {"compression": {"method": "pyramidkv", "keep": 0.5, "window": 4}}}
    lossy = accelc.compile(model, spec)
    assert {r.name for r in lossy.program.history if r.matches} >= {"tsp", "kv_compress"}
    batch = lossy.generate(PROMPTS, max_new_tokens=10).tokens
    assert batch == [lossy.generate([p], max_new_tokens=10).tokens[0] for p in PROMPTS]


# ------------------------------------------------------------------------------- unsupported
def _tiny(cls_cfg, cls_model, **kw):
    return _build(lambda: cls_model(cls_cfg(**{**COMMON, **kw})))


def test_unsupported_architecture_lists_the_supported_ones():
    gpt2 = _build(lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)))
    with pytest.raises(accelc.AccelcError, match=r"architecture 'gpt2' is not supported \(supported: llama, mistral, qwen2\)"):
        accelc.compile(gpt2, {"accelc": 1})


def test_gemma3_is_unsupported():
    gemma = _tiny(Gemma3TextConfig, Gemma3ForCausalLM, sliding_window=8)
    with pytest.raises(accelc.AccelcError, match=r"architecture 'gemma3_text' is not supported \(supported: llama, mistral, qwen2\)"):
        accelc.compile(gemma, {"accelc": 1})


def test_sliding_window_narrower_than_the_context_is_refused_and_would_matter():
    windowed = _tiny(MistralConfig, MistralForCausalLM, sliding_window=8)
    full = _tiny(MistralConfig, MistralForCausalLM, sliding_window=None)
    ids = torch.randint(3, 250, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert not torch.allclose(windowed(ids).logits[:, 8:], full(ids).logits[:, 8:], atol=1e-3)
        torch.testing.assert_close(windowed(ids[:, :8]).logits, full(ids[:, :8]).logits)
    with pytest.raises(accelc.AccelcError, match=r"layers 0, 1, 2 use sliding-window attention \(window 8 < context 2048\)"):
        accelc.compile(windowed, {"accelc": 1})


def test_qwen2_sliding_layers_are_refused():
    qwen = _tiny(Qwen2Config, Qwen2ForCausalLM, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    with pytest.raises(accelc.AccelcError, match=r"layers 2 use sliding-window attention"):
        accelc.compile(qwen, {"accelc": 1})
