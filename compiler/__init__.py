"""accelc: a declarative compiler that makes LLM inference faster.

``spec (YAML) -> plan -> captured FX graph -> passes -> kernels -> runtime engine``.

The public API is three verbs::

    import accelc
    spec = accelc.load_spec("specs/baseline.yaml")
    model = accelc.load_model("llama")            # bundled SmolLM2-135M-Instruct
    cm = accelc.compile(model, spec)
    cm.generate(["Hello"], max_new_tokens=16)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def _unshadow_checkout() -> None:
    """Drop a source checkout's root from ``sys.path``.

    The checkout keeps the subpackages as top-level folders (``compiler/``, ``passes/``,
    ``runtime/``, ``kernels/``) that install as ``accelc.*``.  ``python -m pytest`` or
    ``python -c`` run in the checkout put its root on ``sys.path``, where ``kernels/`` would shadow
    the Hugging Face ``kernels`` package that transformers (>= 5.25) imports.  Nothing is
    importable from the root itself, so removing it changes nothing else.  An installed (not
    editable) accelc has no checkout above it and is left alone."""
    root = Path(__file__).resolve().parent.parent
    if not ((root / "pyproject.toml").is_file() and (root / "kernels" / "linear_cpu.c").is_file()):
        return

    def is_root(entry: str) -> bool:
        try:
            return Path(entry or os.getcwd()).resolve() == root
        except OSError:
            return False

    sys.path[:] = [entry for entry in sys.path if not is_root(entry)]
    shadow = sys.modules.get("kernels")
    if shadow is not None and Path(getattr(shadow, "__file__", None) or "/").resolve().parent == root / "kernels":
        del sys.modules["kernels"]


_unshadow_checkout()

from accelc.errors import AccelcError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["AccelcError", "load_spec", "load_model", "compile", "__version__"]


def load_spec(source):
    """Parse and validate a spec (path, YAML text or dict); see :mod:`accelc.spec`."""
    from accelc.spec import load_spec as _load

    return _load(source)


def load_model(name: str = "llama", **kwargs):
    """Load a model source (``llama``, ``tiny``, a HF directory or a .gguf path); see :mod:`accelc.models`."""
    from accelc.models import load_model as _load

    return _load(name, **kwargs)


def compile(model, spec=None, **kwargs):  # noqa: A001 - the verb is the API
    """Compile ``model`` (a loaded model or HF causal LM) with ``spec``; returns a CompiledModel."""
    from accelc.compiled import compile_model

    return compile_model(model, spec, **kwargs)
