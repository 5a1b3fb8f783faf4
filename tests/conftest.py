"""Shared fixtures: the bundled SmolLM2 (loaded once per session) and tiny random Llamas.

``TRITON_INTERPRET=1`` is set before anything imports a kernel module, so Triton kernels run on
the CPU interpreter in the property suites.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# A tiny Llama whose logits are far from uniform (init std 0.2), so greedy tokens are not ties.
TINY = dict(initializer_range=0.2)


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct (fp32), loaded once."""
    from accelc.models import load_model

    return load_model("llama")


@pytest.fixture(scope="session")
def tiny():
    from accelc.models import load_model

    return load_model("tiny", seed=0, **TINY)


@pytest.fixture(scope="session")
def tiny_compiled(tiny):
    import accelc

    return accelc.compile(tiny, accelc.load_spec({"accelc": 1}))


@pytest.fixture(scope="session")
def smollm2_compiled(smollm2):
    import accelc

    return accelc.compile(smollm2, accelc.load_spec({"accelc": 1}))


def hf_greedy(model, ids: list[int], n: int, eos: bool = True) -> list[int]:
    """HF generate, greedy, the new tokens only."""
    t = torch.tensor([ids])
    with torch.inference_mode():
        kw = {} if eos else {"eos_token_id": None}
        out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, do_sample=False,
                             pad_token_id=model.config.pad_token_id or 0, **kw)
    return out[0, len(ids):].tolist()
