"""The ready specs in specs/: each validates against the bundled model's config, and the user's
example (TSP + KV compression + speculative decoding) composes losslessly on SmolLM2."""
from __future__ import annotations

from pathlib import Path

import pytest

import accelc
from accelc.models import load_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "specs").glob("*.yaml"))


def test_the_specs_the_issues_ask_for_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"baseline.yaml", "fastkv.yaml", "snapkv.yaml", "pyramidkv.yaml", "streaming.yaml", "block_sparse.yaml",
            "quest.yaml", "lserve.yaml", "self_spec.yaml", "lookup.yaml", "recycling.yaml", "example.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_spec_validates_against_the_bundled_model(path):
    spec = accelc.load_spec(path)
    spec.check_model(load_config("llama"), source=str(path))
    assert spec.to_dict()["accelc"] == 1


def test_example_spec_composes_tsp_kv_compression_and_speculation_losslessly(smollm2, smollm2_compiled):
    from accelc.bench_spec import humaneval_prompts

    cm = accelc.compile(smollm2, accelc.load_spec(ROOT / "specs" / "example.yaml"))
    assert cm.spec.features() == ["token_selection", "kv_compression", "speculative"]
    prompts = humaneval_prompts(2)
    got = cm.generate(prompts, max_new_tokens=24)
    plain = cm.engine.plain.generate(prompts, max_new_tokens=24)  # plain greedy over the same compressed cache
    assert got.tokens == plain.tokens
    assert got.stats["speculative"]["tokens_per_step"] >= 1.0
    full = smollm2_compiled.generate(prompts, max_new_tokens=1)
    assert got.stats["kv_cache_bytes_after_prefill"] < full.stats["kv_cache_bytes_after_prefill"]
