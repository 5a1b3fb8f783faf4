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

from accelc.errors import AccelcError

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
