"""kv_cache: attention reads and writes a runtime-owned KV cache, one per layer.

Before::                                   After::
    o = accelc.attention(q, k, v, s)           # new graph inputs per layer i:
                                               #   k_cache_i, v_cache_i (B, Hkv, N, D), cache_len_i (B,)
                                               # shared: q_len (B,), tree_mask (B, S, S) | None
                                               o = accelc.cached_attention(q, k, v, k_cache_i, v_cache_i,
                                                                           cache_len_i, q_len, s, tree_mask)

A sliding-window layer (``accelc.attention(..., window=w)``) also gets the positions of its cache
slots, ``k_pos_i (B, Hkv, N) int64``, and the positions of the new tokens (``position_ids``)::

    o = accelc.attention(q, k, v, s, w)   =>   o = accelc.cached_attention(q, k, v, k_cache_i, v_cache_i, cache_len_i,
                                                                           q_len, s, tree_mask, w, position_ids, k_pos_i)

The runtime allocates the cache, passes it in, and owns rollback (it only resets ``cache_len_i``).
Positions are explicit (``position_ids`` is a graph input), so cache slots and RoPE positions are
independent — which later passes (token selection, KV compression) rely on; windows are measured
in positions, so they stay exact however a layer's cache was thinned.
"""
from __future__ import annotations

import torch

from accelc.fx_utils import add_placeholder, call, calls, fake_tensor, new_symint, placeholder
from accelc.pass_manager import Outcome, Pass, PassContext, Program, register_pass


def cache_input_names(layer: int) -> tuple[str, str, str]:
    """Graph input names of one layer's cache: keys, values, filled length."""
    return f"k_cache_{layer}", f"v_cache_{layer}", f"cache_len_{layer}"


def position_input_name(layer: int) -> str:
    """Graph input name of a sliding-window layer's slot positions."""
    return f"k_pos_{layer}"


@register_pass
class KVCache(Pass):
    name = "kv_cache"
    stage = "cache"
    requires = ("attention_lifted",)
    provides = ("kv_cache",)

    def apply(self, program: Program, ctx: PassContext) -> Outcome:
        gm, info = program.gm, program.info
        sites = sorted(calls(gm, torch.ops.accelc.attention.default), key=lambda n: n.meta["accelc_layer"])
        ids_val = next(n for n in gm.graph.nodes if n.op == "placeholder").meta.get("val")
        B = ids_val.shape[0] if ids_val is not None else None
        S = ids_val.shape[1] if ids_val is not None else None
        N = new_symint(gm)
        long = torch.long
        q_len = add_placeholder(gm, "q_len", fake_tensor(gm, (B,), long) if B is not None else None)
        tree_mask = add_placeholder(gm, "tree_mask", None)
        windows: dict[int, int] = {}
        for n in sites:
            layer = n.meta["accelc_layer"]
            kn, vn, ln = cache_input_names(layer)
            cache_val = fake_tensor(gm, (B, info.n_kv_heads, N, info.head_dim), info.dtype) if N is not None else None
            kc = add_placeholder(gm, kn, cache_val)
            vc = add_placeholder(gm, vn, cache_val)
            cl = add_placeholder(gm, ln, fake_tensor(gm, (B,), long) if B is not None else None)
            q, k, v, scale = n.args[:4]
            window = int(n.args[4]) if len(n.args) > 4 else 0
            args = (q, k, v, kc, vc, cl, q_len, scale, tree_mask)
            if window:
                kp = add_placeholder(gm, position_input_name(layer),
                                     fake_tensor(gm, (B, info.n_kv_heads, N), long) if N is not None else None)
                args += (window, placeholder(gm, "position_ids"), kp)
                windows[layer] = window
            with gm.graph.inserting_before(n):
                new = call(gm, torch.ops.accelc.cached_attention.default, args, like=n)
            n.replace_all_uses_with(new)
            gm.graph.erase_node(n)
        program.meta["kv_cache"] = {"layers": [n.meta["accelc_layer"] for n in sites], "seq_symbol": str(S), "windows": windows}
        notes = [f"{len(sites)} layers read/write the runtime KV cache ({info.n_kv_heads} KV heads x {info.head_dim})"]
        if windows:
            notes.append(f"sliding-window layers {sorted(windows)} also keep their slots' positions (k_pos_i)")
        return Outcome(len(sites), tuple(notes))
