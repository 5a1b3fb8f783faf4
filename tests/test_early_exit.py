"""The early_exit pass (serving decode.speculative): plans for model-free drafts, draft graphs for
fixed and adaptive exit layers sharing the main graph's weights, and the calibrated exit head
(least-squares fit, disk cache, graph equal to its definition)."""
from __future__ import annotations

import functools

import pytest
import torch

import accelc
from accelc.errors import AccelcError
from accelc.passes.early_exit import build_draft_graph, candidate_exit_layers
from accelc.runtime.speculative.calibrate import _hidden_states, _rms_normalise, calibration_ids, exit_adapters, fit_exit_adapters

TINY = dict(initializer_range=0.2)


@pytest.fixture(scope="module")
def tiny_model():
    return accelc.load_model("tiny", seed=1, **TINY)


def compile_spec(model, **speculative):
    return accelc.compile(model, accelc.load_spec({"accelc": 1, "decode": {"speculative": speculative}}))


@pytest.mark.parametrize("draft", ["prompt_lookup", "token_recycling"])
def test_model_free_drafts_record_the_plan_only(tiny_model, draft):
    cm = compile_spec(tiny_model, draft=draft, gamma=4, verify="block")
    rec = next(r for r in cm.program.history if r.name == "early_exit")
    assert rec.matches == 1 and "no graph rewrite" in rec.notes[0]
    assert cm.program.graphs.get("draft") is None
    assert cm.program.meta["speculative"] == {"draft": draft, "gamma": 4, "gamma_max": 8, "verify": "block"}


def test_pass_runs_after_packing_and_before_lowering(tiny_model):
    cm = compile_spec(tiny_model, draft="early_exit", exit_layer=2)
    names = [r.name for r in cm.program.history]
    assert names.index("pack_linear") < names.index("early_exit") < names.index("lower")
    main, draft = cm.program.gm, cm.program.graphs["draft"]
    shared = {n.target for n in draft.graph.nodes if n.op == "get_attr"} & {n.target for n in main.graph.nodes if n.op == "get_attr"}
    attr = lambda gm, t: functools.reduce(getattr, t.split("."), gm)  # noqa: E731
    assert shared and all(attr(draft, t) is attr(main, t) for t in shared)  # no weight copies


def test_adaptive_builds_one_graph_per_candidate(tiny_model):
    cm = compile_spec(tiny_model, draft="early_exit", exit_layer="adaptive")
    meta = cm.program.meta["speculative"]
    assert meta["exit_layers"] == candidate_exit_layers(4) == [2, 3]
    assert set(meta["graphs"].values()) == {"draft_2", "draft_3"} <= set(cm.program.graphs)


def test_candidate_exit_layers():
    assert candidate_exit_layers(30) == [15, 20, 24, 27]
    assert candidate_exit_layers(2) == [1]


def test_exit_layer_out_of_range(tiny_model):
    cm = compile_spec(tiny_model, draft="prompt_lookup")
    with pytest.raises(AccelcError, match="out of range"):
        build_draft_graph(cm.program.gm, 4, 4)
    with pytest.raises(AccelcError, match="exit_layer"):
        accelc.load_spec({"accelc": 1, "decode": {"speculative": {"draft": "early_exit", "exit_layer": 4}}}).check_model(tiny_model.config)


def test_least_squares_adapter_beats_identity_on_calibration_data(tiny_model):
    ids = calibration_ids(tiny_model.model, tiny_model.tokenizer, n_tokens=512)
    k = 2
    ad = fit_exit_adapters(tiny_model.model, [k], ids)[k]
    states = _hidden_states(tiny_model.model, ids, [k, 4])
    x, y = _rms_normalise(states[k]).float(), _rms_normalise(states[4]).float()
    fitted = (x @ ad.weight + ad.bias - y).pow(2).mean()
    identity = (x - y).pow(2).mean()
    assert fitted < 0.9 * identity
    assert 0.0 < ad.r2 <= 1.0


def test_calibrated_head_is_cached_and_matches_its_definition(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELC_CACHE_DIR", str(tmp_path))
    first = compile_spec(tiny_model, draft="early_exit", exit_layer=2, exit_head="calibrated")
    second = compile_spec(tiny_model, draft="early_exit", exit_layer=2, exit_head="calibrated")
    notes = lambda cm: next(r for r in cm.program.history if r.name == "early_exit").notes  # noqa: E731
    assert "fitted now" in notes(first)[1] and "disk cache" in notes(second)[1]
    assert list((tmp_path / "exit_adapters").glob("*_exit2.pt"))
    adapters, hit = exit_adapters(tiny_model.model, [2], tiny_model.tokenizer)
    assert hit
    ad = adapters[2]

    model = tiny_model.model
    ids = torch.tensor([[5, 9, 30, 31, 7, 8]])
    S = ids.shape[1]
    store = {}
    hook = model.model.layers[1].register_forward_hook(lambda _m, _i, o: store.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        hook.remove()
        want = model.lm_head(model.model.norm(_rms_normalise(store["h"]) @ ad.weight + ad.bias))
        cache = second.engine.new_cache(1, S)
        feeds = cache.inputs()
        names = second.program.meta["speculative"]["inputs"]["draft"]
        pos = torch.arange(S)[None]
        meta = second.program.meta["speculative"]
        head = getattr(second.program.gm, meta["head_weight"])
        got, _ = second.program.graphs["draft"](input_ids=ids, position_ids=pos, q_len=torch.tensor([S]), tree_mask=None,
                                                logits_index=pos, draft_head_weight=head, **{n: feeds[n] for n in names if n in feeds})
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
