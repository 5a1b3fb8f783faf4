"""``torch.compile(model, backend="accelc", options={"spec": ...})`` against eager HF.

The end-to-end checks run in a subprocess whose script never imports accelc: the backend must come
from the installed ``torch_dynamo_backends`` entry point.  The script compares logits and HF
``generate`` tokens with eager, counts Dynamo's graphs across prompts and decode steps, and
records the errors for runtime-only spec features.  In-process tests pin the lift's conditions
(which SDPA sites are provably causal) and the options' validation.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    r'''
    import json, logging, sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from torch._dynamo.utils import counters

    class Lines(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    lines = Lines()
    logging.getLogger("accelc.backend").addHandler(lines)
    logging.getLogger("accelc.backend").setLevel(logging.INFO)
    torch.set_num_threads(1)
    out = {}
    cfg = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()

    def generate(ids, n, mask=None):
        with torch.no_grad():
            mask = torch.ones_like(ids) if mask is None else mask
            seq = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
        return seq[:, ids.shape[1]:].tolist()

    def prompt(n, seed):
        return torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(seed))

    prompts = [(prompt(9, 1), 8), (prompt(14, 2), 12), (prompt(21, 3), 16)]
    padded = torch.cat([prompt(11, 5), torch.cat([torch.zeros(1, 4, dtype=torch.long), prompt(7, 6)], 1)])
    padded_mask = (padded != 0).long()
    logits_ids = torch.randint(3, 250, (2, 23), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        eager_logits = model(logits_ids).logits
    eager_tokens = [generate(p, n) for p, n in prompts]
    eager_padded = generate(padded, 10, padded_mask)

    out["accelc_imported_before"] = "accelc" in sys.modules
    compiled = torch.compile(model, backend="accelc", options={"spec": sys.argv[1]})
    with torch.no_grad():
        got = compiled(logits_ids).logits
    out["accelc_imported_after"] = "accelc.backend" in sys.modules
    out["logits_max_diff"] = (got - eager_logits).abs().max().item()
    out["lift_lines"] = [l for l in lines.lines if "lift_causal_sdpa" in l or "lowered" in l]

    def decode_run(dynamic, runs):
        torch._dynamo.reset()
        counters.clear()
        model.forward = torch.compile(model.__class__.forward.__get__(model), backend="accelc",
                                      options={"spec": {"accelc": 1}}, dynamic=dynamic)
        tokens, graphs = [], []
        for p, n in runs:
            tokens.append(generate(p, n))
            graphs.append(counters["stats"]["unique_graphs"])
        return tokens, graphs

    tokens, graphs = decode_run(None, prompts)
    out["tokens_equal"] = tokens == eager_tokens
    out["graphs_after_each_prompt"] = graphs
    out["padded_equal"] = generate(padded, 10, padded_mask) == eager_padded
    tokens, graphs = decode_run(True, prompts[:2])
    out["dynamic_tokens_equal"] = tokens == eager_tokens[:2]
    out["dynamic_graphs_after_each_prompt"] = graphs
    del model.forward

    errors = {}
    for name, spec in [("kv_compression", {"accelc": 1, "kv_cache": {"compression": {"method": "snapkv", "keep": 0.1}}}),
                       ("speculative", {"accelc": 1, "decode": {"speculative": {"draft": "prompt_lookup"}}})]:
        torch._dynamo.reset()
        f = torch.compile(lambda x: x * 2, backend="accelc", options={"spec": spec})
        try:
            f(torch.ones(3))
            errors[name] = None
        except Exception as e:
            inner = getattr(e, "inner_exception", None)
            errors[name] = {"type": type(inner).__name__, "message": str(inner)}
    out["errors"] = errors
    print("RESULT " + json.dumps(out))
    '''
)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """Run :data:`SCRIPT` once in a fresh interpreter; its JSON result."""
    script = tmp_path_factory.mktemp("backend") / "compile_with_accelc.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(script), str(ROOT / "specs" / "baseline.yaml")],
                          capture_output=True, text=True, env=env, cwd=script.parent, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_entry_point_names_the_backend():
    (ep,) = [ep for ep in entry_points(group="torch_dynamo_backends") if ep.name == "accelc"]
    assert ep.value == "accelc.backend:accelc_backend"


def test_backend_loads_through_the_entry_point_without_an_accelc_import(run):
    assert run["accelc_imported_before"] is False
    assert run["accelc_imported_after"] is True


def test_compiled_logits_equal_eager_and_attention_was_lifted_and_lowered(run):
    assert run["logits_max_diff"] < 1e-5
    assert any("2 causal attention sites lifted" in ln for ln in run["lift_lines"]), run["lift_lines"]
    assert any("lowered 2 accelc.attention calls to torch kernels" in ln for ln in run["lift_lines"]), run["lift_lines"]


def test_hf_generate_through_the_backend_gives_eager_tokens(run):
    assert run["tokens_equal"] is True
    assert run["padded_equal"] is True
    assert run["dynamic_tokens_equal"] is True


def test_recompilations_are_bounded_across_prompts_and_decode_steps(run):
    """Default: prefill + decode specialise once, then go dynamic; nothing new after the 2nd prompt.

    ``dynamic=True``: one prefill graph and one decode graph for every prompt and step.
    """
    graphs = run["graphs_after_each_prompt"]
    assert graphs[0] <= 3 and graphs[1] <= 4, graphs
    assert graphs[1] == graphs[2], graphs   # a longer prompt and more decode steps add nothing
    assert run["dynamic_graphs_after_each_prompt"] == [2, 2]


@pytest.mark.parametrize("feature", ["kv_compression", "speculative"])
def test_runtime_only_features_are_a_clear_error(run, feature):
    err = run["errors"][feature]
    assert err is not None and err["type"] == "AccelcError", err
    assert "accelc.compile(model, spec).generate" in err["message"]
    assert ("kv_cache.compression" if feature == "kv_compression" else "decode.speculative") in err["message"]


# ------------------------------------------------------------------------------- in-process
def _attention_sites(q, k, v, q1, mask):
    """Four SDPA calls; only the first is plain causal attention of a whole sequence."""
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    b = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)           # explicit mask
    c = F.scaled_dot_product_attention(q1, k, v, enable_gqa=True)                          # decode: 1 query
    d = F.scaled_dot_product_attention(q[:, :, :3], k, v, is_causal=True, enable_gqa=True)  # fewer queries than keys
    return a, b, c, d


def _lift_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "accelc.backend"]


def test_only_provably_causal_sites_are_lifted_and_results_match(caplog):
    from accelc.backend import accelc_backend

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    q1 = torch.randn(2, 4, 1, 8, generator=g)
    mask = torch.rand(7, 7, generator=g) > 0.3
    mask |= torch.eye(7, dtype=torch.bool)
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="accelc.backend"), torch.no_grad():
        got = torch.compile(_attention_sites, backend=accelc_backend)(q, k, v, q1, mask)
    want = _attention_sites(q, k, v, q1, mask)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert any("1 causal attention sites lifted, 3 left as ATen SDPA" in ln for ln in _lift_lines(caplog)), _lift_lines(caplog)
    torch._dynamo.reset()


def test_graphs_that_need_gradients_are_not_lifted_and_backward_matches(caplog):
    from accelc.backend import accelc_backend

    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 5, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 5, 8, generator=g, requires_grad=True)
    v = torch.randn(1, 2, 5, 8, generator=g, requires_grad=True)
    torch._dynamo.reset()
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum()  # noqa: E731
    with caplog.at_level(logging.INFO, logger="accelc.backend"):
        grads = torch.autograd.grad(torch.compile(fn, backend=accelc_backend)(q, k, v), (q, k, v))
    want = torch.autograd.grad(fn(q, k, v), (q, k, v))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not any("lift" in ln for ln in _lift_lines(caplog))
    torch._dynamo.reset()


def test_options_are_validated():
    import accelc
    from accelc.backend import accelc_backend, backend_spec
    from accelc.errors import NotImplementedYet

    assert backend_spec(None).is_identity and backend_spec({"spec": {"accelc": 1}}).is_identity
    assert backend_spec({"spec": str(ROOT / "specs" / "baseline.yaml")}).is_identity
    with pytest.raises(accelc.AccelcError, match=r"options\.spek: unknown option .*spec"):
        backend_spec({"spek": "x.yaml"})
    with pytest.raises(NotImplementedYet, match=r"prefill\.token_selection.*accelc\.compile\(model, spec\)\.generate"):
        backend_spec({"spec": {"accelc": 1, "prefill": {"token_selection": {"layer": 1, "keep": 0.5}}}})
    with pytest.raises(accelc.AccelcError, match="mode"):
        accelc_backend(None, [], mode="max-autotune")
    torch._dynamo.reset()
    spec_object = torch.compile(lambda x: x * 2, backend="accelc", options={"spec": accelc.load_spec({"accelc": 1})})
    torch.testing.assert_close(spec_object(torch.ones(3)), torch.full((3,), 2.0))
    torch._dynamo.reset()
