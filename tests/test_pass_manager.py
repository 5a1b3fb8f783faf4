"""Pass infrastructure: registry, ordering, bookkeeping and the errors a user can hit."""
from __future__ import annotations

import pytest
import torch

import accelc
from accelc.errors import AccelcError, NotImplementedYet
from accelc.pass_manager import Outcome, Pass, PassContext, PassManager, Program, order_passes, plan_passes, register_pass, registry


def _cls(name, stage="feature", requires=(), provides=()):
    return type(name, (Pass,), {"name": name, "stage": stage, "requires": requires, "provides": provides,
                                "apply": lambda self, p, c: Outcome(1)})


def test_order_follows_stages_then_requires_provides():
    a = _cls("a", provides=("x",), requires=("y",))
    b = _cls("b", provides=("y",))
    low = _cls("low", stage="lower")
    can = _cls("can", stage="canonicalize")
    assert [c.name for c in order_passes([low, a, b, can])] == ["can", "b", "a", "low"]


def test_missing_provider_and_cycles_are_errors():
    with pytest.raises(AccelcError, match="requires 'nothing' but no pass in the plan provides it"):
        order_passes([_cls("a", requires=("nothing",))])
    with pytest.raises(AccelcError, match="cycle"):
        order_passes([_cls("a", requires=("y",), provides=("x",)), _cls("b", requires=("x",), provides=("y",))])


def test_duplicate_registration_is_an_error():
    existing = registry()["lower"]
    with pytest.raises(ValueError, match="already registered"):
        register_pass(type("Other", (Pass,), {"name": "lower", "apply": lambda s, p, c: Outcome(0)}))
    assert registry()["lower"] is existing


def test_plan_of_identity_spec_is_the_core_pipeline():
    names = [p.name for p in plan_passes(accelc.load_spec({"accelc": 1}))]
    assert names == ["canonicalize", "lift_attention", "kv_cache", "select_logits", "pack_linear", "lower"]


def test_plan_inserts_feature_passes_between_cache_and_finalize():
    spec = accelc.load_spec({"accelc": 1, "prefill": {"token_selection": {"layer": 1, "keep": 0.5}},
                             "kv_cache": {"compression": {"method": "snapkv", "keep": 0.5}}})
    names = [p.name for p in plan_passes(spec)]
    assert names.index("select_logits") < names.index("kv_compress") < names.index("pack_linear")
    assert names.index("kv_cache") < names.index("tsp") < names.index("lower")


def test_every_registered_feature_pass_serves_a_spec_feature():
    from accelc.spec import FEATURES

    for name, cls in registry().items():
        assert cls.feature is None or cls.feature in FEATURES, name
        assert cls.__doc__ or cls.__module__, name


def test_unimplemented_feature_is_a_clear_error(monkeypatch):
    import accelc.pass_manager as pm

    served = {k: v for k, v in pm.feature_passes().items() if k != "token_selection"}
    monkeypatch.setattr(pm, "feature_passes", lambda: served)
    spec = accelc.load_spec({"accelc": 1, "prefill": {"token_selection": {"layer": 1, "keep": 0.5}}})
    with pytest.raises(NotImplementedYet, match="prefill.token_selection: is valid but not implemented yet"):
        plan_passes(spec)


def test_a_requested_pass_that_matches_nothing_is_an_error(tiny):
    from accelc.compiled import _captured

    class Nothing(Pass):
        name = "nothing_matches"
        feature = "token_selection"

        def apply(self, program, ctx):
            return Outcome(0)

    gm, info, _, _ = _captured(tiny.model)
    prog = Program(gm, info)
    with pytest.raises(AccelcError, match="matched nothing in the graph although the spec asks for prefill.token_selection"):
        PassManager([Nothing()], PassContext(spec=None)).run(prog)


def test_a_failing_pass_names_itself_and_the_passes_before_it(tiny):
    from accelc.compiled import _captured

    class Boom(Pass):
        name = "boom"

        def apply(self, program, ctx):
            raise RuntimeError("kaputt")

    plan = plan_passes(accelc.load_spec({"accelc": 1}))[:2] + [Boom()]
    gm, info, _, _ = _captured(tiny.model)
    with pytest.raises(AccelcError, match=r"pass boom: failed with RuntimeError: kaputt \(passes run before it: canonicalize, lift_attention"):
        PassManager(plan, PassContext(spec=None)).run(Program(gm, info))


def test_results_are_recorded_and_dump_writes_each_graph(tiny, tmp_path):
    cm = accelc.compile(tiny, {"accelc": 1, "prefill": {"token_selection": {"layer": 1, "keep": 0.5}}}, dump=tmp_path)
    hist = cm.program.history
    assert [r.name for r in hist][-1] == "lower"
    lift = next(r for r in hist if r.name == "lift_attention")
    assert lift.matches == tiny.config.num_hidden_layers and lift.nodes_after < lift.nodes_before
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files[0] == "00_captured.txt"
    assert any(f.endswith("_tsp.prefill.txt") for f in files)
    text = (tmp_path / files[-1]).read_text()
    assert "cached_attention" in text and "scaled_dot_product_attention" not in text


def test_custom_ops_pass_opcheck():
    B, H, Hkv, S, D, N = 2, 4, 2, 5, 8, 12
    q, k, v = torch.randn(B, H, S, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    torch.library.opcheck(torch.ops.accelc.attention.default, (q, k, v, 0.3))
    kc, vc = torch.zeros(B, Hkv, N, D), torch.zeros(B, Hkv, N, D)
    torch.library.opcheck(torch.ops.accelc.cached_attention.default,
                          (q, k, v, kc, vc, torch.tensor([0, 3]), torch.tensor([5, 4]), 0.3, None),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.accelc.gather_positions.default, (torch.randn(B, S, D), torch.tensor([[4], [2]])))
    torch.library.opcheck(torch.ops.accelc.gather_tokens.default, (torch.randn(B, S, D), torch.tensor([[0, 4], [1, 2]])))
    torch.library.opcheck(torch.ops.accelc.compress_cache.default,
                          (q, torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D), torch.tensor([5, 5]), torch.tensor([5, 5]), 0.3, 2, 3, "max", 0.5, 0),
                          test_utils=("test_schema", "test_faketensor"))


def test_windowed_custom_ops_pass_opcheck():
    """The sliding-window forms: the stateless op's window, the cached op writing slot positions,
    KV compression compacting them."""
    import accelc.ops  # noqa: F401  (registers the ops)

    B, H, Hkv, S, D, N = 2, 4, 2, 5, 8, 12
    q, k, v = torch.randn(B, H, S, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    torch.library.opcheck(torch.ops.accelc.attention.default, (q, k, v, 0.3, 3))
    q_pos = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
    k_pos = torch.zeros(B, Hkv, N, dtype=torch.long)
    torch.library.opcheck(torch.ops.accelc.cached_attention.default,
                          (q, k, v, torch.zeros(B, Hkv, N, D), torch.zeros(B, Hkv, N, D), torch.tensor([0, 3]), torch.tensor([5, 4]),
                           0.3, None, 3, q_pos, k_pos),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.accelc.compress_cache.default,
                          (q, torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D), torch.tensor([5, 5]), torch.tensor([5, 5]), 0.3, 2, 3,
                           "max", 0.5, 0, 3, torch.arange(N).expand(B, Hkv, N).contiguous()),
                          test_utils=("test_schema", "test_faketensor"))


def test_windowed_cached_attention_writes_positions_and_hides_keys_outside_the_window():
    """Prefill 6 tokens at positions 10..15 then decode position 16 with window 3: the decode
    query equals plain attention over the keys at positions 14, 15, 16 only."""
    import accelc.ops  # noqa: F401  (registers the ops)

    torch.manual_seed(0)
    H, Hkv, D, W = 4, 2, 8, 3
    kc, vc = torch.zeros(1, Hkv, 8, D), torch.zeros(1, Hkv, 8, D)
    k_pos, length = torch.zeros(1, Hkv, 8, dtype=torch.long), torch.tensor([0])
    k, v = torch.randn(1, Hkv, 7, D), torch.randn(1, Hkv, 7, D)
    q = torch.randn(1, H, 7, D)
    attend = torch.ops.accelc.cached_attention.default
    attend(q[:, :, :6], k[:, :, :6], v[:, :, :6], kc, vc, length, torch.tensor([6]), 0.3, None, W,
           torch.arange(10, 16)[None], k_pos)
    out = attend(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], kc, vc, length, torch.tensor([1]), 0.3, None, W,
                 torch.tensor([[16]]), k_pos)
    assert length.tolist() == [7] and k_pos[0, :, :7].tolist() == [list(range(10, 17))] * Hkv
    want = torch.nn.functional.scaled_dot_product_attention(q[:, :, 6:], k[:, :, 4:], v[:, :, 4:], scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, want)
