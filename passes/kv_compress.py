"""kv_compress: SnapKV / PyramidKV KV-cache compression at the prefill cache write.

SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"): the last
``window`` prompt queries vote (softmax attention, pooled along the sequence) for the prompt
positions each KV head keeps; the window itself is always kept.  PyramidKV (Cai et al. 2024,
"PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"): the same
selection with per-layer budgets that decrease linearly with depth and average to the requested
budget (top/bottom ratio set by beta = 20 as in the paper).  Scores are per KV head (GQA: summed
over the group's query heads), so the cache is never expanded to query heads.

Rewrites the *prefill* graph only; decode attends over the compacted cache and appends to it::

    o = accelc.cached_attention(q, k, v, kc_i, vc_i, len_i, ...)     o = accelc.cached_attention(...)   (attention sees all)
                                                              =>     accelc.compress_cache(q, kc_i, vc_i, len_i, ..., keep_i)

On a sliding-window layer the op also compacts the slot positions ``k_pos_i`` (the window stays
measured in token positions) and ranks entries that no later query can reach below all others.
"""
from __future__ import annotations


import torch

from accelc.fx_utils import call, calls, placeholder
from accelc.ops import attention_window, cached_attention_targets
from accelc.pass_manager import Outcome, Pass, PassContext, Program, register_pass
from accelc.passes.tsp import keep_args

PYRAMID_BETA = 20.0


def layer_keeps(method: str, keep: float | int, n: int) -> list[float | int]:
    """Per-layer keep values for ``n`` compressed layers (in depth order).

    snapkv: the same everywhere.  pyramidkv: linear from (2 - 1/beta)·keep down to keep/beta,
    averaging to ``keep``.  Fractions are capped at 1 and the excess is handed to the deeper layers
    (water-filling), so the average stays ``keep`` and ``keep = 1.0`` keeps everything everywhere.
    Budgets are rounded (at least 1).
    """
    if method == "snapkv" or n == 1:
        return [keep] * n
    top, bottom = 2.0 - 1.0 / PYRAMID_BETA, 1.0 / PYRAMID_BETA
    factors = [top - (top - bottom) * j / (n - 1) for j in range(n)]
    if isinstance(keep, int) and not isinstance(keep, bool):
        return [max(1, int(round(keep * f))) for f in factors]
    want = [keep * f for f in factors]
    capped = [False] * n
    while True:
        excess = sum(max(0.0, w - 1.0) for w, c in zip(want, capped) if not c)
        for j in range(n):
            if want[j] >= 1.0:
                want[j], capped[j] = 1.0, True
        free = [j for j in range(n) if not capped[j]]
        if excess <= 1e-12 or not free:
            return want
        total = sum(want[j] for j in free)
        for j in free:
            want[j] += excess * want[j] / total


@register_pass
class KVCompress(Pass):
    name = "kv_compress"
    feature = "kv_compression"
    requires = ("kv_cache",)
    provides = ("kv_compressed",)

    def apply(self, program: Program, ctx: PassContext) -> Outcome:
        cfg = self.spec.kv_cache.compression
        info = program.info
        layers = cfg.layers.resolve(info.n_layers, where="kv_cache.compression.layers")
        keeps = dict(zip(layers, layer_keeps(cfg.method, cfg.keep, len(layers))))
        gm = program.prefill_graph()
        # Budgets are relative to the prompt (as FastKV's), also in layers that token selection
        # thinned out: a copy of q_len that token selection does not rewire.
        with gm.graph.inserting_after(placeholder(gm, "q_len")):
            prompt_len = call(gm, torch.ops.aten.clone.default, (placeholder(gm, "q_len"),))
        n = 0
        for attn in calls(gm, *cached_attention_targets()):
            layer = attn.meta.get("accelc_layer")
            if layer not in keeps:
                continue
            q, _k, _v, kc, vc, cl, _ql, scale = attn.args[:8]
            fraction, budget = keep_args(keeps[layer])
            args = (q, kc, vc, cl, prompt_len, scale, cfg.window, cfg.kernel, cfg.pooling, fraction, budget)
            sliding, _q_pos, k_pos = attention_window(attn)
            if sliding:
                args += (sliding, k_pos)
            with gm.graph.inserting_after(attn):
                call(gm, torch.ops.accelc.compress_cache.default, args, {"floor": cfg.min_keep} if cfg.min_keep else None,
                     like=attn)
            n += 1
        program.meta["kv_compress"] = {"method": cfg.method, "keeps": keeps}
        shown = ", ".join(f"{l}:{_fmt(k)}" for l, k in list(keeps.items())[:4]) + (" ..." if len(keeps) > 4 else "")
        floor = f", at least {cfg.min_keep}" if cfg.min_keep else ""
        return Outcome(n, (f"{cfg.method}: {n} layers keep their top entries per KV head{floor} (+{cfg.window} window); "
                           f"keep per layer {shown}",))


def _fmt(k) -> str:
    return f"{k:.3g}" if isinstance(k, float) else str(k)


