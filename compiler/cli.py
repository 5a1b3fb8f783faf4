"""The ``accelc`` command line (DESIGN.md, "CLI contract").

Every user error is an :class:`~accelc.errors.AccelcError`; :func:`main` prints it as one line
``error: <where>: <what> (<hint>)`` on stderr and exits with status 2 — never a traceback.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from accelc.errors import AccelcError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="accelc: a declarative compiler that makes LLM inference faster.",
)

SPEC_ARG = typer.Argument(..., help="Path to a YAML spec (see specs/).", show_default=False)
MODEL_OPT = typer.Option("llama", "--model", "-m", help="llama (bundled SmolLM2-135M), tiny, a HF directory or a .gguf path.")


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


@app.command()
def validate(
    spec: Path = SPEC_ARG,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Also check model-dependent values (layer indices) against this model's config; no weights are loaded."),
) -> None:
    """Validate a spec file (no model needed; --model also checks layer indices)."""
    from accelc.spec import load_spec

    s = load_spec(spec)
    where = str(spec)
    if model is not None:
        from accelc.models import load_config

        cfg = load_config(model)
        s.check_model(cfg, source=where)
        typer.echo(f"ok: {where} is a valid accelc spec v{s.accelc} for model {model!r} ({cfg.num_hidden_layers} layers)")
    else:
        typer.echo(f"ok: {where} is a valid accelc spec v{s.accelc}")


@app.command()
def schema() -> None:
    """Print the JSON schema of the spec format (for editors)."""
    from accelc.spec import json_schema

    _echo_json(json_schema())


class _Progress:
    """A rich status line on a terminal, nothing under --json or when not a TTY."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self._status = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console

            self._status = Console(stderr=True).status("starting")
            self._status.__enter__()
        return self

    def __call__(self, what: str) -> None:
        if self._status is not None:
            self._status.update(f"accelc: {what}")

    def __exit__(self, *exc):
        if self._status is not None:
            self._status.__exit__(*exc)


def _load(model: str, progress: _Progress):
    from accelc.models import load_model

    progress(f"loading model {model}")
    return load_model(model, progress=False)


def _compile(spec: Path, model: str, progress: _Progress, dump: Optional[Path] = None):
    from accelc.compiled import compile_model
    from accelc.spec import load_spec

    s = load_spec(spec)
    loaded = _load(model, progress)
    return compile_model(loaded, s, dump=dump, progress=lambda name: progress(f"pass {name}"))


@app.command("compile")
def compile_cmd(
    spec: Path = SPEC_ARG,
    model: str = MODEL_OPT,
    dump: Optional[Path] = typer.Option(None, "--dump", help="Write the graph text after each pass into this directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the compile report as JSON."),
) -> None:
    """Compile a model with a spec and print what each pass did."""
    with _Progress(not as_json) as progress:
        cm = _compile(spec, model, progress, dump)
    rep = cm.report
    if as_json:
        _echo_json(rep)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"accelc compile {spec} --model {model}")
    for col in ("pass", "matches", "nodes before", "nodes after", "ms", "notes"):
        t.add_column(col)
    for r in rep["passes"]:
        t.add_row(r["name"], str(r["matches"]), str(r["nodes_before"]), str(r["nodes_after"]), f"{1000 * r['seconds']:.1f}", "; ".join(r["notes"]))
    c = Console()
    c.print(t)
    c.print(f"{rep['architecture']}: {rep['layers']} layers, {rep['heads']} heads / {rep['kv_heads']} KV heads; "
            f"capture {rep['capture_s']} s; backend {rep['backend']}; features: {', '.join(rep['features']) or 'none (identity)'}")
    if dump:
        c.print(f"graphs written to {dump}")


@app.command()
def generate(
    spec: Path = SPEC_ARG,
    model: str = MODEL_OPT,
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="A prompt (repeat for a batch)."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="A file with one prompt (or a JSON list of prompts)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", help="Default: the spec's decode.max_new_tokens."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print text, tokens, prompt_tokens and stats as JSON."),
) -> None:
    """Generate text with a compiled model."""
    prompts = _read_prompts(prompt, prompt_file)
    _check_sampling(max_new_tokens, temperature, top_p, top_k)
    with _Progress(not as_json) as progress:
        cm = _compile(spec, model, progress)
        progress("generating")
        res = cm.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, chat=chat)
    if as_json:
        _echo_json(res.to_dict())
        return
    for i, text in enumerate(res.texts):
        if len(res.texts) > 1:
            typer.echo(f"--- [{i}]")
        typer.echo(text)
    st = res.stats
    typer.echo(f"[{st['new_tokens']} tokens; TTFT {st['ttft_s']} s; decode {st['decode_tokens_per_s']} tokens/s]", err=True)


@app.command()
def bench(
    spec: Path = SPEC_ARG,
    model: str = MODEL_OPT,
    suite: str = typer.Option("decode", "--suite", "-s", help="prefill (TTFT), decode (tokens/s, KV memory), passkey (retrieval accuracy), ppl (perplexity), spec (speculative vs greedy and HF prompt lookup), spec_gamma (every gamma policy), spec_exit (acceptance per exit layer)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Spec to compare against (default: the identity spec)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for <suite>.json, <suite>.md and the PNG plots."),
    repeats: int = typer.Option(3, "--repeats", help="Interleaved repeats of timed suites; the median is reported."),
    settings: Optional[list[str]] = typer.Option(None, "--set", help="A suite setting KEY=VALUE, e.g. lengths=512,1024 or contexts=4096 (repeatable)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Measure the spec against HF and the baseline side by side in one run."""
    from accelc.bench import parse_settings, run_bench, suite_settings

    if repeats < 1:
        raise AccelcError("--repeats", f"must be >= 1, got {repeats}")
    kw = parse_settings(settings)
    if "repeats" in suite_settings(suite):
        kw.setdefault("repeats", repeats)
    with _Progress(not as_json) as progress:
        rep = run_bench(spec, model, suite, baseline, out, progress=progress, **kw)
    if as_json:
        _echo_json(rep.to_dict())
    else:
        typer.echo(rep.markdown())
        for n in rep.notes:
            typer.echo(f"- {n}")
        if out:
            typer.echo(f"written: {out}/{suite}.json, {suite}.md and {', '.join(p.file for p in rep.plots) or 'a plot'}")


@app.command()
def explain(
    spec: Path = SPEC_ARG,
    model: str = MODEL_OPT,
    seq_len: int = typer.Option(2048, "--seq-len", "-n", help="Prompt length N for the prefill prediction."),
    context: Optional[int] = typer.Option(None, "--context", "-c", help="Cached tokens C for decode and memory (default: --seq-len)."),
    batch: int = typer.Option(1, "--batch", help="Rows decoded together."),
    acceptance: Optional[float] = typer.Option(None, "--acceptance", help="Speculative acceptance rate in [0, 1] for the expected speedup."),
    plain: bool = typer.Option(False, "--plain", help="Formulas as one-line text instead of sympy's pretty print."),
    as_json: bool = typer.Option(False, "--json", help="Numbers and formulas (as text) as JSON."),
) -> None:
    """Predict the spec's speedups with the sympy cost model (model config only, no weights)."""
    from accelc.cost import Dims, predict
    from accelc.models import load_config
    from accelc.spec import load_spec

    s = load_spec(spec)
    cfg = load_config(model)
    s.check_model(cfg, source=str(spec))
    pred = predict(s, None, cfg, seq_len, context, batch=batch, acceptance=acceptance)
    if as_json:
        _echo_json({"spec": str(spec), "model": model, "features": s.features(), **pred.to_dict()})
        return
    _print_explain(spec, model, s, Dims.from_config(cfg), pred, plain)


def _print_explain(spec: Path, model: str, s, dims, pred, plain: bool) -> None:
    import sympy

    from rich.console import Console

    c = Console(highlight=False)
    width = c.width if c.is_terminal else 120

    def show(name: str, expr) -> None:
        if plain:
            c.print(f"  {name} = {expr}", soft_wrap=True, markup=False)
        else:
            c.print(f"  {name} =", markup=False)
            c.print("    " + sympy.pretty(expr, use_unicode=True, num_columns=width - 4).replace("\n", "\n    "), soft_wrap=True, markup=False)

    c.print(f"[bold]accelc explain {spec} --model {model}[/bold]: L={dims.n_layers}, d={dims.hidden}, H={dims.heads}, "
            f"H_kv={dims.kv_heads}, D_h={dims.head_dim}, I={dims.intermediate}, V={dims.vocab}, e={dims.dtype_bytes} bytes")
    c.print(f"features: {', '.join(s.features()) or 'none (identity)'}")
    c.print("\n[bold]Cost model[/bold] (symbols: N prompt tokens, C cached tokens, B batch, e bytes per element)")
    for name, expr in pred.symbolic.items():
        show(name, expr)
    c.print("\n[bold]With this model's dimensions[/bold]")
    for name, expr in pred.formulas.items():
        show(name, expr)
    c.print(f"\n[bold]Predicted[/bold] at N={pred.seq_len}, C={pred.context}, B={pred.batch}:")
    c.print(f"  prefill speedup   {pred.prefill_speedup:.3f}x  (FLOPs {pred.prefill_flops[0]:.3e} -> {pred.prefill_flops[1]:.3e})")
    c.print(f"  decode speedup    {pred.decode_speedup:.3f}x  (bytes per step {pred.decode_bytes[0]:.3e} -> {pred.decode_bytes[1]:.3e}"
            + (f", speculative {pred.spec_speedup:.3f}x at alpha={pred.acceptance}, gamma={pred.gamma}, c={pred.draft_cost:.3f})" if pred.spec_speedup else ")"))
    c.print(f"  KV memory ratio   {pred.kv_memory_ratio:.4f}   ({pred.kv_bytes[0] / 2**20:.2f} MiB -> {pred.kv_bytes[1] / 2**20:.2f} MiB)")
    if pred.ideal:
        c.print(f"  TSP alone, ideal  {pred.ideal['tsp_speedup_ideal']:.3f}x exact FLOP ratio, {pred.ideal['tsp_speedup_linear']:.3f}x linear limit 1/(l'/L + (1-l'/L)r)")
    for a in pred.assumptions:
        c.print(f"  [dim]assumes: {a}[/dim]")


@app.command()
def check(
    spec: Path = SPEC_ARG,
    model: str = MODEL_OPT,
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Spec to compare against (default: the identity spec)."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write the verdicts as JUnit XML to this file."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write each suite's JSON, markdown and plots here."),
    settings: Optional[list[str]] = typer.Option(None, "--set", help="Override a CI setting SUITE.KEY=VALUE, e.g. prefill.repeats=5 (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the verdicts as JSON."),
) -> None:
    """Run the spec's checks: exit 0 when all hold, 1 when some fail, 2 for bad input."""
    from accelc.check import junit_xml, parse_overrides, run_checks, table

    overrides = parse_overrides(settings)
    with _Progress(not as_json) as progress:
        run = run_checks(spec, model, baseline_path=baseline, overrides=overrides, out_dir=out, progress=progress)
    if junit is not None:
        junit.parent.mkdir(parents=True, exist_ok=True)
        junit.write_text(junit_xml(run))
    if as_json:
        _echo_json(run.to_dict())
    else:
        from rich.console import Console

        c = Console()
        c.print(table(run))
        failed = sum(not r.passed for r in run.results)
        c.print(f"{len(run.results) - failed}/{len(run.results)} checks hold" + (f"; JUnit XML: {junit}" if junit else ""))
    raise typer.Exit(run.exit_code)


@app.command()
def report(directory: Path = typer.Argument(..., help="A directory written by `accelc bench --out` or `accelc check --out`.")) -> None:
    """Re-render the markdown tables and PNG plots from the bench JSON files in DIRECTORY."""
    from accelc.bench import render_dir

    for p in render_dir(directory):
        typer.echo(f"written: {p}")


def _read_prompts(prompt: Optional[list[str]], prompt_file: Optional[Path]) -> list[str]:
    if bool(prompt) == (prompt_file is not None):
        raise AccelcError("generate", "give exactly one of --prompt or --prompt-file", "e.g. --prompt 'What is the capital of France?'")
    if prompt:
        return list(prompt)
    assert prompt_file is not None
    if not prompt_file.is_file():
        raise AccelcError(f"--prompt-file {prompt_file}", "no such file", "give the path of a text file")
    try:
        text = prompt_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AccelcError(f"--prompt-file {prompt_file}", "is not UTF-8 text", "save the prompt as UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise AccelcError(f"--prompt-file {prompt_file}:{e.lineno}", f"invalid JSON list: {e.msg}", "a JSON list of strings, or plain text") from None
        if not (isinstance(data, list) and data and all(isinstance(x, str) for x in data)):
            raise AccelcError(f"--prompt-file {prompt_file}", "the JSON must be a non-empty list of strings", "e.g. [\"first prompt\", \"second\"]")
        return data
    if not text.strip():
        raise AccelcError(f"--prompt-file {prompt_file}", "is empty", "write the prompt into the file")
    return [text]


def _check_sampling(n, temperature, top_p, top_k) -> None:
    if n is not None and n < 1:
        raise AccelcError("--max-new-tokens", f"must be >= 1, got {n}")
    if temperature is not None and temperature < 0:
        raise AccelcError("--temperature", f"must be >= 0, got {temperature}", "0 means greedy")
    if top_p is not None and not 0 < top_p <= 1:
        raise AccelcError("--top-p", f"must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise AccelcError("--top-k", f"must be >= 0, got {top_k}", "0 turns top-k off")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the app, turning user errors into ``error: ...`` + exit 2."""
    import typer.exceptions as tex

    try:
        rv = app(args=argv, standalone_mode=False, prog_name="accelc")
    except AccelcError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except tex.Exit as e:  # --help and friends
        sys.exit(getattr(e, "exit_code", 0))
    except tex.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(130)
    except tex.TyperException as e:  # usage errors: missing argument, bad option value, ...
        if getattr(e, "exit_code", 2) == 0:
            sys.exit(0)
        msg = e.format_message() if hasattr(e, "format_message") else str(e)
        cmd = " ".join(getattr(getattr(e, "ctx", None), "command_path", "accelc").split()) if getattr(e, "ctx", None) else "accelc"
        typer.echo(f"error: {cmd}: {msg} (run `{cmd} --help`)", err=True)
        sys.exit(2)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
