"""The generation loop over a compiled graph: prefill, decode, batching, stopping, stats.

Batches are right-padded: row b has ``n_b`` real prompt tokens at positions ``0..n_b-1`` and pad
tokens after them.  Padding never influences a real token (attention is causal and each row's
cache length advances by its real length only), so every row of a batch produces what it would
alone.  After prefill each row decodes from its own true next position.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from accelc.errors import AccelcError
from accelc.runtime.cache import KVCache
from accelc.runtime.pystack import deep_stack
from accelc.runtime.sampling import SamplingParams, choose


@dataclass
class GenerationResult:
    """Per-row outputs and the run's statistics.

    texts / tokens: generated continuation per prompt (stop string and EOS excluded from text;
    EOS kept in tokens as HF does).  prompt_tokens: prompt length per row.  stats: ttft_s,
    prefill_s, decode_s, decode_tokens_per_s, new_tokens, kv_cache_bytes, plus feature stats.
    """

    texts: list[str]
    tokens: list[list[int]]
    prompt_tokens: list[int]
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, row: int | None = None) -> dict[str, Any]:
        if row is None and len(self.texts) == 1:
            row = 0
        if row is not None:
            return {"text": self.texts[row], "tokens": self.tokens[row], "prompt_tokens": self.prompt_tokens[row], "stats": self.stats}
        return {"text": self.texts, "tokens": self.tokens, "prompt_tokens": self.prompt_tokens, "stats": self.stats}


def chat_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as one user turn of the tokenizer's chat template, ready to generate."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(chat, add_special_tokens=False))


class Engine:
    """Runs a CompiledModel's graph with a runtime-owned KV cache."""

    def __init__(self, compiled):
        self.cm = compiled
        self.info = compiled.info
        self.gm = compiled.program.gm
        # Prefill-only rewrites (token selection, KV compression) live in their own graph.
        self.prefill_gm = compiled.program.graphs.get("prefill", self.gm)

    # ------------------------------------------------------------------ one forward
    def new_cache(self, batch: int, capacity: int) -> KVCache:
        meta = self.cm.program.meta
        return KVCache(self.info, batch, capacity, pages=meta.get("quest"), streaming=meta.get("streaming_evict"),
                       windows=meta.get("kv_cache", {}).get("windows"))

    def step(
        self,
        cache: KVCache,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        q_len: torch.Tensor,
        logits_index: torch.Tensor,
        tree_mask: torch.Tensor | None = None,
        prefill: bool = False,
    ) -> torch.Tensor:
        """One forward: input_ids/position_ids (B, S), q_len (B,), logits_index (B, n) -> logits (B, n, V).

        ``prefill=True`` runs the prefill graph on an empty cache (prompt-only rewrites apply).
        """
        cache.ensure(input_ids.shape[1])
        return (self.prefill_gm if prefill else self.gm)(
            input_ids=input_ids,
            position_ids=position_ids,
            q_len=q_len,
            tree_mask=tree_mask,
            logits_index=logits_index,
            **cache.inputs(),
        )

    @deep_stack
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits (B, S, V) of a fresh cache (for equivalence checks)."""
        B, S = input_ids.shape
        cache = self.new_cache(B, S)
        pos = torch.arange(S, device=input_ids.device).expand(B, S)
        q_len = torch.full((B,), S, dtype=torch.long, device=input_ids.device)
        return self.step(cache, input_ids, pos, q_len, pos.contiguous())

    # ------------------------------------------------------------------ generation
    def encode(self, prompts: Sequence[str], chat: bool = False) -> list[list[int]]:
        tok = self.cm.tokenizer
        if tok is None:
            raise AccelcError("generate", "this compiled model has no tokenizer", "pass token ids instead of text, or load the model with accelc.load_model")
        out = []
        for p in prompts:
            if chat:
                out.append(chat_ids(tok, p))
            else:
                out.append(list(tok.encode(p)))
        return out

    def decode(self, ids: list[int]) -> str:
        tok = self.cm.tokenizer
        return tok.decode(ids, skip_special_tokens=True) if tok is not None else ""

    @deep_stack
    @torch.inference_mode()
    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        max_new_tokens: int = 128,
        sampling: SamplingParams | None = None,
        chat: bool = False,
        stop: Sequence[str] = (),
        eos: bool = True,
        on_token: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        """Generate continuations of one prompt or a batch (text or token ids)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise AccelcError("generate", "no prompts given", "pass at least one prompt")
        if isinstance(prompts[0], str):
            ids = self.encode(prompts, chat=chat)
        else:
            ids = [list(map(int, p)) for p in prompts]
        if max_new_tokens < 1:
            raise AccelcError("generate: max_new_tokens", f"must be >= 1, got {max_new_tokens}")
        for i, p in enumerate(ids):
            if len(p) == 0:
                raise AccelcError(f"generate: prompt {i}", "is empty after tokenization", "give at least one token")
            if len(p) + max_new_tokens > self.info.max_positions:
                raise AccelcError(
                    f"generate: prompt {i}",
                    f"{len(p)} prompt tokens + {max_new_tokens} new tokens exceed the model's context of {self.info.max_positions}",
                    "shorten the prompt or lower --max-new-tokens",
                )
        return self._generate_ids(ids, max_new_tokens, sampling or SamplingParams(), stop, eos, on_token)

    def _generate_ids(self, prompts, max_new_tokens, sampling, stop, eos, on_token) -> GenerationResult:
        dev = self.info.device
        B = len(prompts)
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=dev)
        S = int(lens.max())
        ids = torch.full((B, S), self.info.pad_token_id, dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        gen = sampling.generator(dev) if not sampling.greedy else None
        eos_ids = torch.tensor(self.info.eos_token_ids or [-1], device=dev)

        t0 = time.perf_counter()
        cache = self.new_cache(B, S + max_new_tokens)
        pos = torch.arange(S, device=dev).expand(B, S)
        logits = self.step(cache, ids, pos, lens, (lens - 1).unsqueeze(1), prefill=True)
        cache.evict(slack=0)
        cache.trim(max_new_tokens)
        kv_after_prefill = cache.nbytes_used()
        nxt = choose(logits[:, -1], sampling, gen)
        t_first = time.perf_counter()

        out: list[list[int]] = [[] for _ in range(B)]
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        seen = lens.clone()
        ones = torch.ones(B, dtype=torch.long, device=dev)
        zeros_idx = torch.zeros((B, 1), dtype=torch.long, device=dev)
        steps = 0
        for t in range(max_new_tokens):
            toks = nxt.tolist()
            for b in range(B):
                if not finished[b]:
                    out[b].append(toks[b])
                    if on_token is not None:
                        on_token(b, toks[b])
            if eos:
                finished |= torch.isin(nxt, eos_ids)
            if stop:
                for b in range(B):
                    if not finished[b] and _hits_stop(self.decode(out[b][-16:]), stop):
                        finished[b] = True
            if bool(finished.all()) or t == max_new_tokens - 1:
                break
            logits = self.step(cache, nxt.unsqueeze(1), seen.unsqueeze(1), ones, zeros_idx)
            cache.evict()
            seen += 1
            steps += 1
            nxt = choose(logits[:, -1], sampling, gen)
        t_end = time.perf_counter()

        texts = [_cut_at_stop(self.decode(o), stop) for o in out]
        decode_s = t_end - t_first
        stats = {
            "batch": B,
            "ttft_s": round(t_first - t0, 4),
            "prefill_s": round(t_first - t0, 4),
            "decode_s": round(decode_s, 4),
            "new_tokens": sum(len(o) for o in out),
            "decode_tokens_per_s": round(steps * B / decode_s, 3) if decode_s > 0 and steps else None,
            "kv_cache_bytes": cache.nbytes_used(),
            "kv_cache_bytes_after_prefill": kv_after_prefill,
        }
        return GenerationResult(texts, out, [len(p) for p in prompts], stats)


def _hits_stop(tail: str, stop: Sequence[str]) -> bool:
    return any(s in tail for s in stop)


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]
