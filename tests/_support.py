"""Helpers shared by the test modules (imported as ``from _support import ...``)."""
from __future__ import annotations

import torch

# A tiny Llama whose logits are far from uniform (init std 0.2), so greedy tokens are not ties.
TINY = dict(initializer_range=0.2)


def hf_greedy(model, ids: list[int], n: int, eos: bool = True) -> list[int]:
    """HF generate, greedy, the new tokens only."""
    t = torch.tensor([ids])
    with torch.inference_mode():
        kw = {} if eos else {"eos_token_id": None}
        out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, do_sample=False,
                             pad_token_id=model.config.pad_token_id or 0, **kw)
    return out[0, len(ids):].tolist()
