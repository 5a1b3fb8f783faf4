"""The CLI contract: compile / generate / validate --model, JSON outputs, and bad input -> exit 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from accelc.cli import main

BASE = "specs/baseline.yaml"


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_generate_json_through_the_installed_script():
    p = subprocess.run(["accelc", "generate", BASE, "--model", "tiny", "--prompt", "hello", "--max-new-tokens", "5", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert set(doc) == {"text", "tokens", "prompt_tokens", "stats"}
    assert len(doc["tokens"]) == 5 and doc["prompt_tokens"] == 5
    assert {"ttft_s", "prefill_s", "decode_tokens_per_s", "kv_cache_bytes"} <= set(doc["stats"])
    assert "Traceback" not in p.stderr


def test_compile_json_reports_every_pass(capsys, tmp_path):
    code, out, _ = run(["compile", BASE, "--model", "tiny", "--json", "--dump", str(tmp_path)], capsys)
    assert code == 0
    rep = json.loads(out)
    assert [p["name"] for p in rep["passes"]] == ["canonicalize", "lift_attention", "kv_cache", "select_logits", "pack_linear", "lower"]
    assert rep["layers"] == 4 and rep["features"] == []
    assert (tmp_path / "00_captured.txt").exists()


def test_generate_batch_of_prompts_from_a_json_file(capsys, tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(["a", "bcd"]))
    code, out, _ = run(["generate", BASE, "--model", "tiny", "--prompt-file", str(f), "-n", "3", "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["prompt_tokens"] == [1, 3] and all(len(t) == 3 for t in doc["tokens"])


def test_validate_with_model_checks_layers_from_the_config(capsys, tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text("accelc: 1\nprefill:\n  token_selection: {layer: 2, keep: 0.5}\n")
    assert run(["validate", str(ok), "--model", "tiny"], capsys)[0] == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("accelc: 1\nprefill:\n  token_selection: {layer: 15, keep: 0.5}\n")
    code, _, err = run(["validate", str(bad), "--model", "tiny"], capsys)
    assert code == 2 and err.startswith("error: ") and "prefill.token_selection.layer" in err and "4 layers" in err


@pytest.mark.parametrize("argv, needle", [
    (["generate", BASE, "--model", "tiny"], "give exactly one of --prompt or --prompt-file"),
    (["generate", BASE, "--model", "tiny", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["generate", BASE, "--model", "tiny", "--prompt", "x", "--temperature", "-1"], "--temperature: must be >= 0"),
    (["generate", BASE, "--model", "tiny", "--prompt", "x", "--top-p", "1.5"], "--top-p: must be in (0, 1]"),
    (["generate", BASE, "--model", "tiny", "--prompt-file", "/nonexistent/p.txt"], "no such file"),
    (["generate", BASE, "--model", "/nonexistent/model", "--prompt", "x"], "does not exist"),
    (["generate", "/nonexistent/spec.yaml", "--model", "tiny", "--prompt", "x"], "spec.yaml"),
    (["compile", BASE, "--model", "no-such-model"], "no-such-model"),
    (["bench", BASE, "--model", "tiny", "--suite", "nope"], "--suite"),
    (["generate", BASE, "--bogus"], "No such option: --bogus"),
])
def test_bad_input_is_one_error_line_and_exit_2(capsys, argv, needle):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and needle in err, err
    assert "Traceback" not in err and err.count("\n") == 1


def test_prompt_file_that_is_not_utf8_or_empty(capsys, tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"\xff\xfe\x00bad")
    code, _, err = run(["generate", BASE, "--model", "tiny", "--prompt-file", str(f)], capsys)
    assert code == 2 and "not UTF-8" in err
    f.write_text("   \n")
    code, _, err = run(["generate", BASE, "--model", "tiny", "--prompt-file", str(f)], capsys)
    assert code == 2 and "is empty" in err


def test_prompt_longer_than_context_exits_2(capsys, tmp_path):
    f = tmp_path / "long.txt"
    f.write_text("x" * 2100)  # tiny: one token per byte, context 2048
    code, _, err = run(["generate", BASE, "--model", "tiny", "--prompt-file", str(f)], capsys)
    assert code == 2 and "exceed the model's context of 2048" in err


def test_help_exits_0(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "generate" in out and "compile" in out


def test_module_entry_point_exists():
    p = subprocess.run([sys.executable, "-c", "import accelc.cli as c; print(callable(c.main))"], capture_output=True, text=True)
    assert p.stdout.strip() == "True"
