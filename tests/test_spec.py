"""Spec format v1 (accelc.spec): parsing, every bad-input class, round trips, LayerSet, check_model.

Error messages are asserted part by part: *where* (``<file>:<line>: <key.path>``), *what* (names the
bad value) and *hint* (allowed values / did-you-mean).  No model and no torch are needed.
"""
from __future__ import annotations

import copy
import functools
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from accelc.errors import AccelcError
from accelc.spec import (
    FEATURES,
    BlockSparse,
    EarlyExit,
    LayerSet,
    PromptLookup,
    Quest,
    Spec,
    SpecError,
    Streaming,
    TokenRecycling,
    json_schema,
    load_spec,
    load_spec_text,
)

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "specs" / "baseline.yaml"
MODEL = types.SimpleNamespace(num_hidden_layers=30, num_attention_heads=9)

FULL = """\
accelc: 1
name: everything
prefill:
  token_selection: {layer: 15, keep: 0.2, window: 8, kernel: 7, pooling: max}
kv_cache:
  compression: {method: snapkv, keep: 0.1, window: 8, kernel: 7, layers: all}
attention:
  sparse:
    - {method: streaming, sink: 4, local: 256, layers: "20-29", heads: [0, 8]}
    - {method: block_sparse, block: 64, top_blocks: 8, layers: [0, 1, 2]}
    - {method: quest, page: 16, top_pages: 8, layers: "2-29"}
decode:
  temperature: 0.0
  stop: ["</s>"]
  speculative: {draft: early_exit, exit_layer: 8, gamma: adaptive, gamma_max: 8, verify: block}
checks:
  - {metric: prefill_speedup, min: 1.4, seq_len: 2048}
  - {metric: identical_tokens}
"""


def _err(text: str, source: str = "x.yaml") -> SpecError:
    """The SpecError raised for ``text`` (dedented)."""
    with pytest.raises(AccelcError) as info:
        load_spec_text(textwrap.dedent(text), source)
    return info.value


def _assert_parts(e: AccelcError, where: str, what: tuple[str, ...] = (), hint: tuple[str, ...] = ()) -> None:
    assert e.where == where, str(e)
    for part in what:
        assert part in e.what, str(e)
    for part in hint:
        assert e.hint is not None and part in e.hint, str(e)


# --------------------------------------------------------------------------- valid specs


def test_baseline_file_is_the_identity_spec():
    spec = load_spec(BASELINE)
    assert spec.accelc == 1 and spec.is_identity and spec.features() == []
    assert spec == Spec.identity()
    assert spec.to_dict() == {"accelc": 1}
    assert spec.source == str(BASELINE)
    assert spec.prefill is None and spec.decode is None and spec.checks == []


def test_full_example_values_and_defaults():
    spec = load_spec_text(FULL)
    ts = spec.prefill.token_selection
    assert (ts.layer, ts.keep, ts.window, ts.kernel, ts.pooling) == (15, 0.2, 8, 7, "max")
    kc = spec.kv_cache.compression
    assert kc.method == "snapkv" and kc.layers == LayerSet("all") and kc.pooling == "max"
    stream, block, quest = spec.attention.sparse
    assert isinstance(stream, Streaming) and stream.layers.resolve(30) == list(range(20, 30))
    assert stream.heads == [0, 8]
    assert isinstance(block, BlockSparse) and (block.sink_blocks, block.local_blocks) == (1, 1)
    assert isinstance(quest, Quest) and quest.top_pages == 8
    sp = spec.decode.speculative
    assert isinstance(sp, EarlyExit) and sp.exit_layer == 8 and sp.gamma == "adaptive" and sp.exit_head == "plain"
    assert spec.decode.top_p == 1.0 and spec.decode.max_new_tokens == 128 and spec.decode.seed is None
    assert [c.metric for c in spec.checks] == ["prefill_speedup", "identical_tokens"]
    assert spec.checks[0].seq_len == 2048 and spec.checks[1].min is None
    assert spec.features() == list(FEATURES) and not spec.is_identity
    assert spec.source == "<string>"


def test_section_defaults():
    spec = load_spec({"accelc": 1, "prefill": {"token_selection": {"layer": 3, "keep": 64}},
                      "attention": {"sparse": [{"method": "streaming"}]},
                      "decode": {"speculative": {"draft": "token_recycling"}}})
    ts = spec.prefill.token_selection
    assert (ts.keep, ts.window, ts.kernel, ts.pooling) == (64, 8, 7, "max") and isinstance(ts.keep, int)
    st_ = spec.attention.sparse[0]
    assert (st_.sink, st_.local, st_.heads, st_.layers) == (4, 256, "all", LayerSet("all"))
    tr = spec.decode.speculative
    assert isinstance(tr, TokenRecycling) and (tr.successors, tr.tree_width, tr.gamma, tr.gamma_max, tr.verify) == (
        8, 8, "heuristic", 8, "token")
    pl = load_spec({"accelc": 1, "decode": {"speculative": {"draft": "prompt_lookup"}}}).decode.speculative
    assert isinstance(pl, PromptLookup) and (pl.ngram_min, pl.ngram_max) == (1, 3)
    d = load_spec({"accelc": 1, "decode": {"temperature": 1}}).decode
    assert d.temperature == 1.0 and d.top_k == 0 and d.stop == []


@pytest.mark.parametrize("section, feature", [
    ({"prefill": {"token_selection": {"layer": 1, "keep": 0.5}}}, ["token_selection"]),
    ({"kv_cache": {"compression": {"method": "pyramidkv", "keep": 128}}}, ["kv_compression"]),
    ({"attention": {"sparse": [{"method": "quest", "top_pages": 2}]}}, ["sparse_attention"]),
    ({"decode": {"speculative": {"draft": "prompt_lookup"}}}, ["speculative"]),
    ({"prefill": {}, "kv_cache": {}, "attention": {"sparse": []}, "decode": {"temperature": 0.7}}, []),
])
def test_features_name_exactly_the_requested_sections(section, feature):
    spec = load_spec({"accelc": 1, **section})
    assert spec.features() == feature
    assert spec.is_identity == (feature == [])


def test_load_spec_sources(tmp_path):
    spec = load_spec_text(FULL)
    assert load_spec(spec) is spec
    p = tmp_path / "s.yaml"
    p.write_text(FULL)
    assert load_spec(p) == spec and load_spec(str(p)) == spec
    assert load_spec(str(p)).source == str(p)
    assert load_spec(spec.to_dict()).source == "<dict>"
    with pytest.raises(AccelcError, match="expected a file path, a dict or a Spec, got int"):
        load_spec(3)


def test_spec_is_immutable():
    spec = load_spec_text(FULL)
    with pytest.raises(Exception):
        spec.prefill.token_selection.layer = 3


def test_yaml_12_scalars():
    """``1e3`` is a float (not the string PyYAML 1.1 makes of it); ``no`` is a string, not false."""
    e = _err("accelc: 1\nprefill: {token_selection: {layer: 1, keep: 1e3, pooling: max}}\n")
    _assert_parts(e, "x.yaml:2: prefill.token_selection.keep", ("1000.0 is a float above 1",), ("write 1000",))
    e = _err("accelc: 1\nprefill: {token_selection: {layer: 1, keep: 0.5, pooling: no}}\n")
    _assert_parts(e, "x.yaml:2: prefill.token_selection.pooling", ("'no' is not one of max, avg",))
    assert load_spec_text("accelc: 1\nprefill: {token_selection: {layer: 1, keep: 5e-1}}\n").prefill \
        .token_selection.keep == 0.5


# --------------------------------------------------------------------------- bad input: one row per class

TS = "accelc: 1\nprefill:\n  token_selection:\n    layer: 15\n    keep: {keep}\n"
BAD = [
    # version
    ("accelc: 2\n", "x.yaml:1: accelc", ("unsupported spec version 2",), ("supported versions: 1",)),
    ("name: a\n", "x.yaml:1: accelc", ("missing required key 'accelc'",), ("accelc: 1",)),
    ("accelc: '1'\n", "x.yaml:1: accelc", ("must be an integer", "a string '1'"), ("supported versions: 1",)),
    ("accelc: true\n", "x.yaml:1: accelc", ("a boolean true",), ()),
    # unknown keys
    ("accelc: 1\nprefil: {}\n", "x.yaml:2: prefil", ("unknown key 'prefil'",),
     ("did you mean 'prefill'?", "allowed keys: accelc, name, description, prefill")),
    ("accelc: 1\nprefill:\n  token_selection: {layer: 1, keep: 0.5, kernal: 7}\n", "x.yaml:3: prefill.token_selection.kernal",
     ("unknown key 'kernal'",), ("did you mean 'kernel'?", "allowed keys: layer, keep, window, kernel, pooling")),
    ("accelc: 1\ndecode:\n  zzz: 1\n", "x.yaml:3: decode.zzz", ("unknown key 'zzz'",), ("allowed keys: temperature",)),
    ("accelc: 1\n1: 2\n", "x.yaml:2: '1'", ("key 1 is an integer",), ("quote it",)),
    # wrong types
    ("accelc: 1\nprefill: {token_selection: {layer: '15', keep: 0.5}}\n", "x.yaml:2: prefill.token_selection.layer",
     ("expected an integer, got a string '15'",), ("remove the quotes", "an int >= 0")),
    ("accelc: 1\nprefill: {token_selection: {layer: 15.0, keep: 0.5}}\n", "x.yaml:2: prefill.token_selection.layer",
     ("expected an integer, got a float 15.0",), ("write 15 without the decimal point",)),
    ("accelc: 1\nprefill: {token_selection: {layer: true, keep: 0.5}}\n", "x.yaml:2: prefill.token_selection.layer",
     ("expected an integer, got a boolean true",), ()),
    ("accelc: 1\ndecode: {temperature: hot}\n", "x.yaml:2: decode.temperature", ("expected a number", "'hot'"), ()),
    ("accelc: 1\ndecode: {stop: '</s>'}\n", "x.yaml:2: decode.stop", ("expected a list, got a string",), ()),
    ("accelc: 1\ndecode: {stop: ['a', 3]}\n", "x.yaml:2: decode.stop[1]", ("expected a string, got an integer 3",), ()),
    ("accelc: 1\ndecode: {seed: true}\n", "x.yaml:2: decode.seed", ("a boolean true",), ("or null",)),
    ("accelc: 1\nprefill: 3\n", "x.yaml:2: prefill", ("expected a mapping, got an integer 3",), ()),
    ("accelc: 1\nattention: {sparse: {method: quest}}\n", "x.yaml:2: attention.sparse", ("expected a list",), ()),
    ("accelc: 1\nname: 2024-01-01\n", "x.yaml:2: name", ("expected a string, got a date",), ()),
    # out of range
    ("accelc: 1\nprefill: {token_selection: {layer: -1, keep: 0.5}}\n", "x.yaml:2: prefill.token_selection.layer",
     ("must be >= 0, got -1",), ()),
    ("accelc: 1\ndecode: {top_p: 0}\n", "x.yaml:2: decode.top_p", ("must be > 0, got 0",), ("(0, 1]",)),
    ("accelc: 1\ndecode: {top_p: 1.5}\n", "x.yaml:2: decode.top_p", ("must be <= 1, got 1.5",), ()),
    ("accelc: 1\ndecode: {temperature: .nan}\n", "x.yaml:2: decode.temperature", ("finite number",), ()),
    ("accelc: 1\ndecode: {stop: ['']}\n", "x.yaml:2: decode.stop[0]", ("must not be empty",), ()),
    ("accelc: 1\nprefill: {token_selection: {layer: 1, keep: 0.5, window: 0}}\n",
     "x.yaml:2: prefill.token_selection.window", ("must be >= 1, got 0",), ("an int >= 1",)),
    # fraction vs budget
    (TS.format(keep=0), "x.yaml:5: prefill.token_selection.keep", ("0 is neither a fraction in (0, 1] nor a token budget",),
     ("a float in (0, 1]", "an int >= 1")),
    (TS.format(keep=1.5), "x.yaml:5: prefill.token_selection.keep", ("1.5 is a float above 1",), ("token budget",)),
    (TS.format(keep=-3), "x.yaml:5: prefill.token_selection.keep", ("-3 is neither a fraction",), ()),
    (TS.format(keep=-0.5), "x.yaml:5: prefill.token_selection.keep", ("-0.5 is not a fraction in (0, 1]",), ()),
    (TS.format(keep=256.0), "x.yaml:5: prefill.token_selection.keep", ("256.0",), ("write 256",)),
    (TS.format(keep="'0.2'"), "x.yaml:5: prefill.token_selection.keep", ("got a string '0.2'",), ()),
    (TS.format(keep="true"), "x.yaml:5: prefill.token_selection.keep", ("got a boolean true",), ()),
    # odd kernel, powers of two, literals
    ("accelc: 1\nkv_cache:\n  compression: {method: snapkv, keep: 0.1, kernel: 6}\n",
     "x.yaml:3: kv_cache.compression.kernel", ("kernel must be odd", "got 6"), ("use 5 or 7",)),
    ("accelc: 1\nkv_cache:\n  compression: {method: snapkvv, keep: 0.1}\n", "x.yaml:3: kv_cache.compression.method",
     ("'snapkvv' is not one of snapkv, pyramidkv",), ("did you mean 'snapkv'?",)),
    ("accelc: 1\nattention: {sparse: [{method: block_sparse, block: 48, top_blocks: 2}]}\n",
     "x.yaml:2: attention.sparse[0].block", ("48 is not a power of two",), ("use 32 or 64",)),
    ("accelc: 1\nattention: {sparse: [{method: block_sparse, block: 8, top_blocks: 2}]}\n",
     "x.yaml:2: attention.sparse[0].block", ("must be >= 16, got 8",), ()),
    ("accelc: 1\nattention: {sparse: [{method: quest, page: 3, top_pages: 2}]}\n",
     "x.yaml:2: attention.sparse[0].page", ("3 is not a power of two",), ("use 2 or 4",)),
    # layer sets
    ("accelc: 1\nattention:\n  sparse:\n    - {method: streaming, layers: '29-20'}\n",
     "x.yaml:4: attention.sparse[0].layers", ("reversed range '29-20'",), ("write '20-29'",)),
    ("accelc: 1\nattention: {sparse: [{method: streaming, layers: -1}]}\n", "x.yaml:2: attention.sparse[0].layers",
     ("negative layer index -1",), ()),
    ("accelc: 1\nattention: {sparse: [{method: streaming, layers: '-1-5'}]}\n", "x.yaml:2: attention.sparse[0].layers",
     ("negative layer index in range '-1-5'",), ()),
    ("accelc: 1\nattention: {sparse: [{method: streaming, layers: [1, -2]}]}\n", "x.yaml:2: attention.sparse[0].layers",
     ("negative layer index -2",), ()),
    ("accelc: 1\nattention: {sparse: [{method: streaming, layers: [3, 1, 3]}]}\n",
     "x.yaml:2: attention.sparse[0].layers", ("duplicate layer 3",), ()),
    ("accelc: 1\nattention: {sparse: [{method: streaming, layers: []}]}\n", "x.yaml:2: attention.sparse[0].layers",
     ("empty layer list",), ()),
    ("accelc: 1\nattention: {sparse: [{method: streaming, layers: 'al'}]}\n", "x.yaml:2: attention.sparse[0].layers",
     ("invalid layer set 'al'",), ("'all'", "'a-b'")),
    ("accelc: 1\nattention: {sparse: [{method: streaming, layers: '5'}]}\n", "x.yaml:2: attention.sparse[0].layers",
     ("invalid layer set '5'",), ("write 5 without quotes",)),
    ("accelc: 1\nattention: {sparse: [{method: streaming, layers: [1.0]}]}\n", "x.yaml:2: attention.sparse[0].layers",
     ("must hold integers", "a float 1.0"), ()),
    # list entries name their index
    ("accelc: 1\nattention:\n  sparse:\n    - {method: streaming}\n    - {method: quest, page: 16}\n",
     "x.yaml:5: attention.sparse[1].top_pages", ("missing required key 'top_pages'",), ("an int >= 1",)),
    ("accelc: 1\nattention:\n  sparse:\n    - {method: quest, top_pages: 0}\n",
     "x.yaml:4: attention.sparse[0].top_pages", ("must be >= 1, got 0",), ()),
    ("accelc: 1\nattention:\n  sparse:\n    - {method: quset, top_pages: 1}\n", "x.yaml:4: attention.sparse[0].method",
     ("unknown method 'quset'",), ("did you mean 'quest'?", "streaming, block_sparse, quest")),
    ("accelc: 1\nattention:\n  sparse:\n    - {top_pages: 1}\n", "x.yaml:4: attention.sparse[0]",
     ("missing key 'method'",), ("streaming, block_sparse, quest",)),
    ("accelc: 1\nattention:\n  sparse:\n    - 5\n", "x.yaml:4: attention.sparse[0]", ("expected a mapping",), ()),
    ("accelc: 1\nattention:\n  sparse:\n    - {method: quest, top_pages: 1, local: 4}\n",
     "x.yaml:4: attention.sparse[0].local", ("'local' belongs to method streaming, not method quest",),
     ("method: quest takes method, page, top_pages, layers",)),
    # streaming heads
    ("accelc: 1\nattention: {sparse: [{method: streaming, heads: al}]}\n", "x.yaml:2: attention.sparse[0].heads",
     ("invalid heads 'al'",), ("did you mean 'all'?",)),
    ("accelc: 1\nattention: {sparse: [{method: streaming, heads: [2, 2]}]}\n", "x.yaml:2: attention.sparse[0].heads",
     ("duplicate head indices",), ()),
    ("accelc: 1\nattention: {sparse: [{method: streaming, heads: [-1]}]}\n", "x.yaml:2: attention.sparse[0].heads",
     ("negative head index -1",), ()),
    # speculative
    ("accelc: 1\ndecode:\n  speculative: {draft: early_exit, exit_layer: 8, ngram_max: 3}\n",
     "x.yaml:3: decode.speculative.ngram_max", ("'ngram_max' belongs to draft prompt_lookup, not draft early_exit",),
     ("draft: early_exit takes draft, gamma, gamma_max, verify, exit_layer, exit_head",)),
    ("accelc: 1\ndecode:\n  speculative: {draft: early_exti, exit_layer: 8}\n", "x.yaml:3: decode.speculative.draft",
     ("unknown draft 'early_exti'",), ("did you mean 'early_exit'?", "early_exit, prompt_lookup, token_recycling")),
    ("accelc: 1\ndecode:\n  speculative: {gamma: 3}\n", "x.yaml:3: decode.speculative", ("missing key 'draft'",), ()),
    ("accelc: 1\ndecode:\n  speculative: {draft: early_exit}\n", "x.yaml:3: decode.speculative.exit_layer",
     ("missing required key 'exit_layer'",), ("'adaptive'",)),
    ("accelc: 1\ndecode:\n  speculative: {draft: early_exit, exit_layer: 0}\n", "x.yaml:3: decode.speculative.exit_layer",
     ("exit_layer must be >= 1, got 0",), ("an int >= 1 or 'adaptive'",)),
    ("accelc: 1\ndecode:\n  speculative: {draft: early_exit, exit_layer: adaptiv}\n",
     "x.yaml:3: decode.speculative.exit_layer", ("unknown exit_layer 'adaptiv'",), ("did you mean 'adaptive'?",)),
    ("accelc: 1\ndecode:\n  speculative:\n    draft: prompt_lookup\n    gamma: 9\n", "x.yaml:5: decode.speculative.gamma",
     ("gamma 9 exceeds gamma_max 8",), ()),
    ("accelc: 1\ndecode:\n  speculative: {draft: prompt_lookup, gamma: fixed}\n", "x.yaml:3: decode.speculative.gamma",
     ("unknown gamma 'fixed'",), ("'heuristic' or 'adaptive'",)),
    ("accelc: 1\ndecode:\n  speculative: {draft: prompt_lookup, gamma: '4'}\n", "x.yaml:3: decode.speculative.gamma",
     ("unknown gamma '4'",), ()),
    ("accelc: 1\ndecode:\n  speculative:\n    draft: prompt_lookup\n    ngram_min: 4\n",
     "x.yaml:5: decode.speculative.ngram_min", ("ngram_min 4 exceeds ngram_max 3",), ()),
    ("accelc: 1\ndecode:\n  speculative: {draft: token_recycling, verify: tree}\n", "x.yaml:3: decode.speculative.verify",
     ("'tree' is not one of token, block",), ()),
    # min_keep floors a fraction only
    ("accelc: 1\nkv_cache:\n  compression: {method: snapkv, keep: 256, min_keep: 64}\n",
     "x.yaml:3: kv_cache.compression.min_keep", ("min_keep 64 only applies to a fractional keep",), ("keep as a fraction",)),
    ("accelc: 1\nprefill:\n  token_selection: {layer: 3, keep: 100, min_keep: 8}\n",
     "x.yaml:3: prefill.token_selection.min_keep", ("min_keep 8 only applies to a fractional keep",), ("drop min_keep",)),
    ("accelc: 1\nprefill:\n  token_selection: {layer: 3, keep: 0.2, min_keep: -1}\n",
     "x.yaml:3: prefill.token_selection.min_keep", ("must be >= 0, got -1",), ()),
    # checks
    ("accelc: 1\nchecks:\n  - {metric: prefil_speedup, min: 1}\n", "x.yaml:3: checks[0].metric",
     ("'prefil_speedup' is not one of",), ("did you mean 'prefill_speedup'?",)),
    ("accelc: 1\nchecks:\n  - {metric: ppl_increase}\n", "x.yaml:3: checks[0].metric", ("has no bound",),
     ("min, max or min_vs_baseline",)),
    ("accelc: 1\nchecks:\n  - {metric: identical_tokens, min: 1}\n", "x.yaml:3: checks[0].min",
     ("identical_tokens takes no bound",), ("{metric: identical_tokens}",)),
    ("accelc: 1\nchecks:\n  - {metric: decode_speedup, min: 2, max: 1}\n", "x.yaml:3: checks[0].min",
     ("min 2.0 exceeds max 1.0",), ()),
    ("accelc: 1\nchecks:\n  - {metric: decode_speedup, min: 2, seq_len: 0}\n", "x.yaml:3: checks[0].seq_len",
     ("must be >= 1, got 0",), ()),
    # duplicate keys are errors, not last-wins
    ("accelc: 1\nprefill:\n  token_selection:\n    layer: 3\n    keep: 0.5\n    layer: 4\n",
     "x.yaml:6: prefill.token_selection.layer", ("duplicate key 'layer'",), ("first given at line 4",)),
    # document shape and syntax
    ("- accelc: 1\n", "x.yaml:1", ("the top level is a list, not a mapping",), ("accelc: 1",)),
    ("hello\n", "x.yaml:1", ("the top level is a string",), ()),
    ("", "x.yaml", ("empty spec",), ("accelc: 1",)),
    ("# only a comment\n\n", "x.yaml", ("empty spec",), ()),
    ("accelc: 1\nprefill:\n  token_selection: {layer: 1\n  keep: 2}\n", "x.yaml:4:7",
     ("invalid YAML", "flow mapping at line 3"), ("indentation",)),
    ("accelc: 1\nprefill:\n\ttoken_selection: {}\n", "x.yaml:3:1", ("invalid YAML", "'\\t'"), ("not tabs",)),
    ("accelc: 1\n---\naccelc: 1\n", "x.yaml:2:1", ("expected a single document",), ()),
    ("accelc: 1\nname: 'abc\n", "x.yaml:3:1", ("invalid YAML", "quoted scalar at line 2"), ()),
    ("accelc: 1\nname: a\x01b\n", "x.yaml:2", ("control character U+0001",), ()),
]


@pytest.mark.parametrize("text, where, what, hint", BAD, ids=[f"{i}-{row[1]}" for i, row in enumerate(BAD)])
def test_bad_input_names_where_what_and_hint(text, where, what, hint):
    e = _err(text)
    _assert_parts(e, where, what, hint)
    assert "\n" not in str(e)


def test_dict_source_has_no_line():
    with pytest.raises(SpecError) as info:
        load_spec({"accelc": 1, "attention": {"sparse": [{"method": "quest", "top_pages": 1}, {"method": "quest"}]}})
    _assert_parts(info.value, "<dict>: attention.sparse[1].top_pages", ("missing required key 'top_pages'",))


def test_first_error_in_document_order_and_count_of_the_rest():
    """pydantic checks prefill before decode; the report follows the file instead."""
    e = _err("""\
        accelc: 1
        decode: {top_k: -1}
        checks: [{metric: nope, min: 1}]
        prefill: {token_selection: {layer: x, keep: 0}}
        """)
    assert isinstance(e, SpecError)
    _assert_parts(e, "x.yaml:2: decode.top_k", ("must be >= 0, got -1",), ("3 more errors in this spec",))
    assert [m.where for m in e.more] == ["x.yaml:3: checks[0].metric", "x.yaml:4: prefill.token_selection.layer",
                                         "x.yaml:4: prefill.token_selection.keep"]


def test_wrong_version_hides_the_other_errors():
    e = _err("accelc: 3\nprefil: 1\n")
    _assert_parts(e, "x.yaml:1: accelc", ("unsupported spec version 3",))
    assert e.more == []


def test_single_error_does_not_mention_more():
    e = _err("accelc: 1\ndecode: {top_k: -1}\n")
    assert "more error" not in str(e)


def test_recursive_alias_is_an_error_not_a_crash():
    e = _err("accelc: 1\nname: &a [*a]\n")
    assert any("refers to itself" in m.what for m in [e, *e.more])


# --------------------------------------------------------------------------- files


def test_missing_file_suggests_a_close_name(tmp_path):
    (tmp_path / "fastkv.yaml").write_text("accelc: 1\n")
    with pytest.raises(AccelcError) as info:
        load_spec(tmp_path / "fastkvv.yaml")
    _assert_parts(info.value, str(tmp_path / "fastkvv.yaml"), ("no such file",),
                  (f"did you mean {str(tmp_path / 'fastkv.yaml')!r}?",))


def test_missing_file_without_neighbours(tmp_path):
    with pytest.raises(AccelcError) as info:
        load_spec(tmp_path / "nowhere" / "a.yaml")
    _assert_parts(info.value, str(tmp_path / "nowhere" / "a.yaml"), ("no such file",), ("specs/",))


def test_directory_lists_its_specs(tmp_path):
    (tmp_path / "a.yaml").write_text("accelc: 1\n")
    with pytest.raises(AccelcError) as info:
        load_spec(tmp_path)
    _assert_parts(info.value, str(tmp_path), ("is a directory",), ("a.yaml",))


def test_non_utf8_file_names_the_byte_and_line(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("accelc: 1\nname: café\n".encode("latin-1"))
    with pytest.raises(AccelcError) as info:
        load_spec(p)
    _assert_parts(info.value, f"{p}:2", ("not UTF-8", "0xe9"), ("UTF-8",))


def test_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "bom.yaml"
    p.write_bytes(b"\xef\xbb\xbfaccelc: 1\n")
    assert load_spec(p).is_identity


def test_error_in_file_names_file_and_line(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("accelc: 1\n\nprefill:\n  token_selection: {layer: 1, keep: 0}\n")
    with pytest.raises(AccelcError) as info:
        load_spec(p)
    assert info.value.where == f"{p}:4: prefill.token_selection.keep"


# --------------------------------------------------------------------------- round trips


def test_to_dict_round_trips_and_omits_defaults():
    spec = load_spec_text(FULL)
    d = spec.to_dict()
    assert d["accelc"] == 1 and "window" not in d["prefill"]["token_selection"]
    assert d["attention"]["sparse"][0]["layers"] == "20-29" and d["attention"]["sparse"][1]["layers"] == [0, 1, 2]
    assert load_spec(d) == spec
    full = spec.to_dict(defaults=True)
    assert full["prefill"]["token_selection"]["window"] == 8 and load_spec(full) == spec
    assert load_spec_text(yaml.safe_dump(d)) == spec


def test_keep_budget_and_fraction_stay_distinct():
    one_token = load_spec({"accelc": 1, "prefill": {"token_selection": {"layer": 1, "keep": 1}}})
    everything = load_spec({"accelc": 1, "prefill": {"token_selection": {"layer": 1, "keep": 1.0}}})
    assert isinstance(one_token.prefill.token_selection.keep, int)
    assert isinstance(everything.prefill.token_selection.keep, float)
    assert type(load_spec(one_token.to_dict()).prefill.token_selection.keep) is int


def test_equality_ignores_the_source():
    assert load_spec_text("accelc: 1\n", "a.yaml") == load_spec({"accelc": 1}) == Spec.identity()
    assert load_spec_text(FULL) != Spec.identity()


NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz _-", min_size=1, max_size=12).filter(lambda s: s.strip() == s)
KEEP = st.one_of(st.floats(min_value=1e-6, max_value=1.0), st.integers(1, 100_000))
ODD = st.integers(0, 10).map(lambda k: 2 * k + 1)


@st.composite
def layer_sets(draw):
    kind = draw(st.sampled_from(["all", "range", "int", "list"]))
    if kind == "all":
        return "all"
    if kind == "range":
        a = draw(st.integers(0, 40))
        return f"{a}-{draw(st.integers(a, 60))}"
    if kind == "int":
        return draw(st.integers(0, 60))
    return draw(st.lists(st.integers(0, 60), min_size=1, max_size=8, unique=True))


@st.composite
def _options(draw, required: dict, optional: dict) -> dict:
    """``required`` keys always present, each ``optional`` key present or not."""
    out = {k: draw(s) for k, s in required.items()}
    for k, s in optional.items():
        if draw(st.booleans()):
            out[k] = draw(s)
    return out


SPARSE = st.one_of(
    _options({"method": st.just("streaming")}, {"sink": st.integers(0, 64), "local": st.integers(1, 4096),
                                                "layers": layer_sets(),
                                                "heads": st.one_of(st.sampled_from(["all", "auto"]),
                                                                   st.lists(st.integers(0, 31), min_size=1,
                                                                            max_size=4, unique=True))}),
    _options({"method": st.just("block_sparse"), "top_blocks": st.integers(1, 64)},
             {"block": st.integers(4, 9).map(lambda k: 2 ** k), "sink_blocks": st.integers(0, 4),
              "local_blocks": st.integers(1, 4), "layers": layer_sets()}),
    _options({"method": st.just("quest"), "top_pages": st.integers(1, 64)},
             {"page": st.integers(0, 7).map(lambda k: 2 ** k), "layers": layer_sets()}),
)
GAMMA_COMMON = {"gamma": st.one_of(st.integers(1, 8), st.sampled_from(["heuristic", "adaptive"])),
                "verify": st.sampled_from(["token", "block"])}
SPECULATIVE = st.one_of(
    _options({"draft": st.just("early_exit"), "exit_layer": st.one_of(st.integers(1, 40), st.just("adaptive"))},
             {**GAMMA_COMMON, "exit_head": st.sampled_from(["plain", "calibrated"])}),
    _options({"draft": st.just("prompt_lookup")},
             {**GAMMA_COMMON, "ngram_max": st.integers(3, 6), "ngram_min": st.integers(1, 3)}),
    _options({"draft": st.just("token_recycling")},
             {**GAMMA_COMMON, "successors": st.integers(1, 16), "tree_width": st.integers(1, 16)}),
)
CHECK = st.one_of(
    _options({"metric": st.just("identical_tokens")}, {}),
    _options({"metric": st.sampled_from(["prefill_speedup", "decode_speedup", "passkey_accuracy"]),
              "min": st.floats(0, 10)}, {"seq_len": st.integers(1, 8192), "min_vs_baseline": st.floats(0, 2)}),
)
SPECS = _options({"accelc": st.just(1)}, {
    "name": NAME, "description": NAME,
    "prefill": _options({}, {"token_selection": _options(
        {"layer": st.integers(0, 40), "keep": KEEP},
        {"window": st.integers(1, 64), "kernel": ODD, "pooling": st.sampled_from(["max", "avg"])})}),
    "kv_cache": _options({}, {"compression": _options(
        {"method": st.sampled_from(["snapkv", "pyramidkv"]), "keep": KEEP},
        {"window": st.integers(1, 64), "kernel": ODD, "layers": layer_sets()})}),
    "attention": _options({}, {"sparse": st.lists(SPARSE, max_size=3)}),
    "decode": _options({}, {"temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1.0), "top_k": st.integers(0, 50),
                            "seed": st.one_of(st.none(), st.integers(0, 2**32)), "max_new_tokens": st.integers(1, 512),
                            "stop": st.lists(NAME, max_size=2), "speculative": SPECULATIVE}),
    "checks": st.lists(CHECK, max_size=3),
})


@settings(max_examples=60, deadline=None)
@given(SPECS)
def test_random_valid_specs_round_trip(d):
    spec = load_spec(d)
    assert load_spec(spec.to_dict()) == spec
    assert load_spec(spec.to_dict(defaults=True)) == spec
    assert load_spec_text(yaml.safe_dump(d)) == spec
    assert spec.to_dict()["accelc"] == 1


def _mapping_paths(obj, path=()):
    """Every key path in ``obj`` that holds a mapping (where a new key can be injected)."""
    if isinstance(obj, dict):
        yield path
        for k, v in obj.items():
            yield from _mapping_paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _mapping_paths(v, path + (i,))


def _fmt(path) -> str:
    return "".join(f"[{c}]" if isinstance(c, int) else f".{c}" for c in path).lstrip(".")


@settings(max_examples=60, deadline=None)
@given(SPECS, st.data(), st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8))
def test_an_unknown_key_anywhere_is_rejected_by_name(d, data, suffix):
    d = copy.deepcopy(d)
    path = data.draw(st.sampled_from(list(_mapping_paths(d))))
    key = f"zq{suffix}"
    target = d
    for c in path:
        target = target[c]
    target[key] = 1
    with pytest.raises(SpecError) as info:
        load_spec(d)
    _assert_parts(info.value, f"<dict>: {_fmt(path + (key,))}", (f"unknown key '{key}'",), ("allowed keys:",))
    text = yaml.safe_dump(d)
    with pytest.raises(SpecError) as info:
        load_spec_text(text)
    where = info.value.where
    line = int(where.split(":")[1])
    assert where.endswith(f": {_fmt(path + (key,))}") and key in text.splitlines()[line - 1]


def test_json_schema_is_v1_and_accepts_the_examples():
    schema = json_schema()
    assert "accelc" in schema["$id"] and "v1" in schema["$id"] and schema["title"] == "accelc spec v1"
    assert {"TokenSelection", "KVCompression", "Streaming", "BlockSparse", "Quest", "EarlyExit", "PromptLookup",
            "TokenRecycling", "Check"} <= set(schema["$defs"])
    assert schema["additionalProperties"] is False and schema["required"] == ["accelc"]
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(load_spec_text(FULL).to_dict(), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"accelc": 1, "prefil": {}}, schema)


@functools.cache
def _schema_validator():
    jsonschema = pytest.importorskip("jsonschema")
    return jsonschema.Draft202012Validator(json_schema())


@settings(max_examples=40, deadline=None)
@given(SPECS)
def test_json_schema_accepts_every_valid_spec(d):
    _schema_validator().validate(d)


# --------------------------------------------------------------------------- LayerSet


@settings(max_examples=200, deadline=None)
@given(layer_sets(), st.integers(1, 80))
def test_layerset_resolve_matches_brute_force(raw, n):
    ls = LayerSet(raw)
    if raw == "all":
        expected = set(range(n))
    elif isinstance(raw, str):
        a, b = map(int, raw.split("-"))
        expected = set(range(a, b + 1))
    else:
        expected = {raw} if isinstance(raw, int) else set(raw)
    if max(expected) >= n:
        with pytest.raises(AccelcError, match=f"the model has {n} layers"):
            ls.resolve(n, where="here")
        assert ls.problem(n) is not None
    else:
        got = ls.resolve(n)
        assert got == sorted(expected) and len(set(got)) == len(got) and all(0 <= i < n for i in got)
    assert LayerSet(ls.to_raw()) == ls and hash(LayerSet(ls.to_raw())) == hash(ls)


def test_layerset_forms():
    assert LayerSet(" 3 - 5 ").to_raw() == "3-5"
    assert LayerSet("4-4").resolve(5) == [4]
    assert LayerSet([5, 1, 3]).resolve(6) == [1, 3, 5]
    assert LayerSet(2).resolve(3) == [2]
    with pytest.raises(AccelcError) as info:
        LayerSet("0-30").resolve(30, where="kv_cache.compression.layers")
    _assert_parts(info.value, "kv_cache.compression.layers", ("layer 30 is out of range", "30 layers"), ("0-29",))


# --------------------------------------------------------------------------- check_model

OK_FOR_MODEL = """\
accelc: 1
prefill: {token_selection: {layer: 28, keep: 0.2}}
kv_cache: {compression: {method: pyramidkv, keep: 64, layers: "0-29"}}
attention:
  sparse:
    - {method: streaming, heads: [0, 8], layers: [29]}
decode:
  speculative: {draft: early_exit, exit_layer: 29}
"""


def test_check_model_accepts_values_at_the_limits():
    load_spec_text(OK_FOR_MODEL).check_model(MODEL)
    load_spec_text(FULL).check_model(MODEL)
    Spec.identity().check_model(MODEL)


@pytest.mark.parametrize("old, new, where, what", [
    ("layer: 28", "layer: 29", "m.yaml:2: prefill.token_selection.layer", "layer 29 is out of range"),
    ('"0-29"', '"0-30"', "m.yaml:3: kv_cache.compression.layers", "layer 30 is out of range"),
    ("[0, 8]", "[0, 9]", "m.yaml:6: attention.sparse[0].heads", "head 9 is out of range: the model has 9 attention"),
    ("layers: [29]", "layers: [3, 31]", "m.yaml:6: attention.sparse[0].layers", "layer 31 is out of range"),
    ("exit_layer: 29", "exit_layer: 30", "m.yaml:8: decode.speculative.exit_layer", "exit_layer 30 is out of range"),
])
def test_check_model_names_key_and_layer_count(old, new, where, what):
    spec = load_spec_text(OK_FOR_MODEL.replace(old, new), "m.yaml")
    with pytest.raises(SpecError) as info:
        spec.check_model(MODEL)
    _assert_parts(info.value, where, (what,))
    assert "the model has 30 layers" in info.value.what or "9 attention heads" in info.value.what


def test_check_model_reports_all_problems_in_order_and_takes_a_source_label():
    text = OK_FOR_MODEL.replace("layer: 28", "layer: 40").replace("exit_layer: 29", "exit_layer: 31")
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "m.yaml").check_model(MODEL, source="other.yaml")
    assert info.value.where == "other.yaml:2: prefill.token_selection.layer"
    assert [m.where for m in info.value.more] == ["other.yaml:8: decode.speculative.exit_layer"]
    with pytest.raises(SpecError) as info:
        load_spec(load_spec_text(text).to_dict()).check_model(MODEL)
    assert info.value.where == "<dict>: prefill.token_selection.layer"


def test_spec_module_does_not_import_torch():
    code = "import sys, accelc.spec; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
