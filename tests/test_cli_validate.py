"""``accelc validate`` and ``accelc schema`` (DESIGN.md, "CLI contract").

A few cases run the installed console script in a subprocess (the real entry point, exit status,
stderr); the bad-input matrix calls :func:`accelc.cli.main` in-process.  Every bad input must give
exit status 2 and one line ``error: <where>: <what> (<hint>)`` on stderr, never a traceback.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from accelc.cli import main

ROOT = Path(__file__).resolve().parents[1]
ACCELC = shutil.which("accelc")


def _script(*args: str) -> subprocess.CompletedProcess:
    assert ACCELC is not None, "the console script `accelc` is not installed (pip install -e .)"
    return subprocess.run([ACCELC, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def _main(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return info.value.code, out, err


# --------------------------------------------------------------------------- the installed script


def test_script_validates_the_baseline():
    r = _script("validate", "specs/baseline.yaml")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok: specs/baseline.yaml is a valid accelc spec v1"
    assert r.stderr == ""


def test_script_rejects_a_bad_spec_with_one_error_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("accelc: 1\nprefill:\n  token_selection: {layer: 15, keep: 1.5}\n")
    r = _script("validate", str(bad))
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {bad}:3: prefill.token_selection.keep: 1.5 is a float above 1")
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1 and r.stdout == ""


def test_script_rejects_a_missing_file(tmp_path):
    r = _script("validate", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {tmp_path / 'nope.yaml'}: no such file")
    assert "Traceback" not in r.stderr


def test_script_prints_the_json_schema():
    r = _script("schema")
    assert r.returncode == 0, r.stderr
    schema = json.loads(r.stdout)
    assert "accelc" in schema["$id"] and schema["title"] == "accelc spec v1"
    assert "TokenSelection" in schema["$defs"]


# --------------------------------------------------------------------------- in-process matrix

GOOD = """\
accelc: 1
prefill:
  token_selection: {layer: 15, keep: 0.2}
attention:
  sparse:
    - {method: streaming, sink: 4, local: 256, layers: "20-29"}
decode:
  speculative: {draft: early_exit, exit_layer: 8, gamma: adaptive, verify: block}
"""

BAD_FILES = [  # (bytes, where after the file name, parts of the message)
    (b"accelc: 1\nprefill:\n  token_selection: {layer: 1\n  keep: 2}\n", ":4:7", ["invalid YAML", "line 3"]),
    (b"", "", ["empty spec"]),
    (b"- 1\n- 2\n", ":1", ["top level is a list, not a mapping"]),
    (b"name: x\n", ":1: accelc", ["missing required key 'accelc'", "accelc: 1"]),
    (b"accelc: 7\n", ":1: accelc", ["unsupported spec version 7", "supported versions: 1"]),
    (b"accelc: 1\nprefil: {}\n", ":2: prefil", ["unknown key 'prefil'", "did you mean 'prefill'?"]),
    (b"accelc: 1\ndecode: {max_new_tokens: '5'}\n", ":2: decode.max_new_tokens", ["expected an integer", "'5'"]),
    (b"accelc: 1\ndecode: {top_p: 2}\n", ":2: decode.top_p", ["must be <= 1, got 2"]),
    (b"accelc: 1\nkv_cache: {compression: {method: snapkv, keep: 0.1, layers: '9-3'}}\n",
     ":2: kv_cache.compression.layers", ["reversed range '9-3'", "write '3-9'"]),
    (b"accelc: 1\nprefill: {token_selection: {layer: 1, keep: 0}}\n", ":2: prefill.token_selection.keep",
     ["0 is neither a fraction in (0, 1] nor a token budget"]),
    (b"accelc: 1\naccelc: 1\n", ":2: accelc", ["duplicate key 'accelc'"]),
    (b"accelc: 1\nname: \xff\n", ":2", ["not UTF-8", "0xff"]),
]


def test_main_accepts_a_valid_spec(tmp_path, capsys):
    p = tmp_path / "good.yaml"
    p.write_text(GOOD)
    code, out, err = _main(["validate", str(p)], capsys)
    assert code == 0 and out.strip() == f"ok: {p} is a valid accelc spec v1" and err == ""


@pytest.mark.parametrize("content, where, parts", BAD_FILES, ids=[f"{i}{w}" for i, (_, w, _) in enumerate(BAD_FILES)])
def test_main_bad_file_exits_2_with_one_error_line(tmp_path, capsys, content, where, parts):
    p = tmp_path / "spec.yaml"
    p.write_bytes(content)
    code, out, err = _main(["validate", str(p)], capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {p}{where}: "), err
    assert err.count("\n") == 1 and "Traceback" not in err
    for part in parts:
        assert part in err, err


def test_main_directory_and_missing_file(tmp_path, capsys):
    code, _, err = _main(["validate", str(tmp_path)], capsys)
    assert code == 2 and err.startswith(f"error: {tmp_path}: is a directory")
    (tmp_path / "snapkv.yaml").write_text("accelc: 1\n")
    code, _, err = _main(["validate", str(tmp_path / "snapvk.yaml")], capsys)
    assert code == 2 and "no such file" in err and "did you mean" in err and "snapkv.yaml" in err


def test_main_reports_how_many_more_errors(tmp_path, capsys):
    p = tmp_path / "many.yaml"
    p.write_text("accelc: 1\ndecode: {top_k: -1, top_p: 0, seed: x}\n")
    code, _, err = _main(["validate", str(p)], capsys)
    assert code == 2 and err.startswith(f"error: {p}:2: decode.top_k: must be >= 0, got -1")
    assert "2 more errors in this spec" in err


def test_main_schema_is_valid_json(capsys):
    code, out, _ = _main(["schema"], capsys)
    assert code == 0 and json.loads(out)["required"] == ["accelc"]


def test_main_usage_error_exits_2_without_traceback(capsys):
    code, _, err = _main(["validate"], capsys)
    assert code == 2 and err.startswith("error: ")
    assert "Missing argument" in err and "Traceback" not in err
