"""Sparse attention from the spec: invariants, eviction semantics, conflicts, batch equivalence."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import accelc
from accelc.errors import AccelcError
from _support import TINY

PROMPTS = [list(range(3, 140)), list(range(50, 60)), list(range(100, 250))]


def sparse(*entries):
    return {"accelc": 1, "attention": {"sparse": list(entries)}}


@pytest.fixture(scope="module")
def dense_tokens(tiny):
    return accelc.compile(tiny, {"accelc": 1}).generate(PROMPTS, max_new_tokens=30).tokens


@pytest.mark.parametrize("spec", [
    sparse({"method": "streaming", "sink": 4, "local": 4096, "layers": "all"}),
    sparse({"method": "streaming", "sink": 0, "local": 4096, "layers": "1-2", "heads": [0, 1]}),
    sparse({"method": "quest", "page": 16, "top_pages": 64, "layers": "all"}),
    sparse({"method": "block_sparse", "block": 16, "top_blocks": 64, "layers": "all"}),
    sparse({"method": "block_sparse", "block": 16, "top_blocks": 64, "layers": "0-1"},
           {"method": "quest", "page": 8, "top_pages": 512, "layers": "all"}),
], ids=["streaming-local>=seq", "streaming-heads-local>=seq", "quest-all-pages", "block-sparse-all-blocks", "block+quest"])
def test_covering_everything_is_identical_to_dense(tiny, dense_tokens, spec):
    cm = accelc.compile(tiny, spec)
    assert cm.generate(PROMPTS, max_new_tokens=30).tokens == dense_tokens


def test_whole_layer_streaming_evicts_and_equals_streaming_mask_over_the_full_cache(tiny):
    """heads: all keeps only sink + local entries (runtime eviction); listing every head keeps the whole
    cache and masks instead.  Same semantics, so same tokens; less memory for the evicting one."""
    evicting = accelc.compile(tiny, sparse({"method": "streaming", "sink": 4, "local": 24, "layers": "2-3"}))
    masking = accelc.compile(tiny, sparse({"method": "streaming", "sink": 4, "local": 24, "layers": "2-3", "heads": [0, 1, 2, 3]}))
    a = evicting.generate(PROMPTS, max_new_tokens=60)
    b = masking.generate(PROMPTS, max_new_tokens=60)
    assert a.tokens == b.tokens
    assert a.stats["kv_cache_bytes"] < 0.75 * b.stats["kv_cache_bytes"]


@pytest.mark.parametrize("spec", [
    sparse({"method": "streaming", "sink": 4, "local": 16, "layers": "all"}),
    sparse({"method": "streaming", "sink": 2, "local": 16, "layers": "2-3", "heads": [0, 1]},
           {"method": "quest", "page": 16, "top_pages": 2, "layers": "1-3"},
           {"method": "block_sparse", "block": 16, "top_blocks": 2, "layers": "0-1"}),
], ids=["streaming", "lserve-like"])
def test_batch_equals_each_prompt_alone(tiny, spec):
    cm = accelc.compile(tiny, spec)
    batch = cm.generate(PROMPTS, max_new_tokens=30)
    for i, p in enumerate(PROMPTS):
        assert cm.generate([p], max_new_tokens=30).tokens[0] == batch.tokens[i]


@pytest.mark.parametrize("spec, needle", [
    (sparse({"method": "streaming", "layers": "0-1"}, {"method": "block_sparse", "top_blocks": 2, "layers": "1-2"}),
     "layer 1: streaming and block_sparse conflict"),
    (sparse({"method": "streaming", "layers": "all"}, {"method": "quest", "top_pages": 2, "layers": 3}),
     "layer 3: streaming on all heads and quest conflict"),
    (sparse({"method": "quest", "top_pages": 2, "layers": "0-1"}, {"method": "quest", "top_pages": 4, "layers": 1}),
     "layer 1 already has a quest entry (attention.sparse[0])"),
    (sparse({"method": "streaming", "layers": "all", "heads": [0]}), "share KV head 0 with heads [1]"),
    ({**sparse({"method": "quest", "top_pages": 2, "layers": "all"}), "kv_cache": {"compression": {"method": "snapkv", "keep": 0.5, "layers": 2}}},
     "layer 2 is also a quest layer"),
])
def test_conflicting_entries_are_clear_errors(tiny, spec, needle):
    with pytest.raises(AccelcError, match=needle.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        accelc.compile(tiny, spec)


def test_heads_auto_calibrates_once_and_caches_on_disk(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELC_CACHE_DIR", str(tmp_path))
    spec = sparse({"method": "streaming", "sink": 4, "local": 64, "layers": "all", "heads": "auto"})
    cm = accelc.compile(tiny, spec)
    files = list((tmp_path / "calibration").iterdir())
    assert len(files) == 1
    before = files[0].stat().st_mtime_ns
    accelc.compile(tiny, spec)
    assert files[0].stat().st_mtime_ns == before
    assert cm.generate([PROMPTS[0]], max_new_tokens=5).tokens[0]


@settings(max_examples=4, deadline=None)
@given(layers=st.integers(2, 3), kv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]),
       local=st.sampled_from([8, 40]), top=st.sampled_from([1, 3]), block=st.sampled_from([16, 32]))
def test_sparse_pass_on_drawn_tiny_models_runs_lints_and_batches(layers, kv, group, local, top, block):
    loaded = accelc.load_model("tiny", seed=5, num_hidden_layers=layers, num_key_value_heads=kv,
                               num_attention_heads=kv * group, hidden_size=kv * group * 16, **TINY)
    cm = accelc.compile(loaded, sparse({"method": "streaming", "sink": 2, "local": local, "layers": 0},
                                       {"method": "quest", "page": 8, "top_pages": top, "layers": f"1-{layers - 1}"},
                                       {"method": "block_sparse", "block": block, "top_blocks": top, "layers": f"1-{layers - 1}"}))
    for gm in [cm.program.gm, *cm.program.graphs.values()]:
        gm.graph.lint()
    prompts = [list(range(3, 80)), list(range(20, 31))]
    batch = cm.generate(prompts, max_new_tokens=12)
    for i, p in enumerate(prompts):
        assert cm.generate([p], max_new_tokens=12).tokens[0] == batch.tokens[i]
