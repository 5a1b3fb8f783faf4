"""lift_attention: ``aten.scaled_dot_product_attention`` becomes ``accelc::attention``.

The captured HF graph computes, per layer (GQA either with ``repeat_kv`` expanded in the graph or
with SDPA's ``enable_gqa``)::

    k_rep = reshape(expand(unsqueeze(k, 2), [B, Hkv, n_rep, S, D]), [B, H, S, D])     # repeat_kv
    v_rep = ...same for v...
    mask  = <causal mask built from position_ids>                                       # ~20 nodes
    o     = aten.scaled_dot_product_attention(q, k_rep, v_rep, mask, scale=s)

After this pass::

    o = accelc.attention(q, k, v, scale=s)          # k, v: (B, Hkv, S, D); meta accelc_layer = N
    o = accelc.attention(q, k, v, scale=s, window=w)   # a sliding-window layer (Gemma 3, Mistral v0.1)

The repeat is dropped (the op is GQA-aware, so the KV cache later stores Hkv heads, never H), the
mask computation becomes dead and is removed.  Two variants share the rewrite:

* :class:`LiftAttention` (registered, part of every ``accelc.compile`` plan) lifts every site of a
  graph from :func:`accelc.capture.capture`.  That graph is captured without an attention mask, so
  its mask is the causal mask, narrowed on sliding-window layers to the window the config gives
  them (:attr:`accelc.capture.ModelInfo.windows`, HF's ``sliding_window_overlay``: query ``p`` sees
  keys ``p - w < j <= p``); the lifted op carries that window.  Padding is the runtime's job
  (right padding + per-row lengths).
* :class:`LiftCausalSDPA` (not registered; used by the ``torch.compile`` backend) lifts only the
  sites that are provably plain causal attention of a whole sequence: no mask, ``is_causal=True``,
  no dropout and as many keys as queries.  Every other site (decode against HF's cache, padded
  batches, sliding windows) is left to ATen, so the rewrite never changes a result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from accelc import ops
from accelc.capture import layer_of
from accelc.errors import AccelcError
from accelc.fx_utils import call, calls
from accelc.pass_manager import Outcome, Pass, PassContext, Program, register_pass

aten = torch.ops.aten
_SDPA_POSITIONAL = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


@dataclass(frozen=True)
class SDPASite:
    """The arguments of one ``aten.scaled_dot_product_attention`` node, by name.

    query (B, H, S, D), key/value (B, H or Hkv, N, D) nodes; attn_mask a node or None;
    scale None means SDPA's default ``D ** -0.5``.
    """

    node: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    attn_mask: Any
    dropout_p: float
    is_causal: bool
    scale: float | None
    enable_gqa: bool

    @classmethod
    def of(cls, node: fx.Node) -> "SDPASite":
        args = dict(zip(_SDPA_POSITIONAL, node.args))
        args.update(node.kwargs)
        return cls(
            node=node, query=args["query"], key=args["key"], value=args["value"],
            attn_mask=args.get("attn_mask"), dropout_p=float(args.get("dropout_p", 0.0)),
            is_causal=bool(args.get("is_causal", False)), scale=args.get("scale"),
            enable_gqa=bool(args.get("enable_gqa", False)),
        )


def under_repeat_kv(node: fx.Node) -> fx.Node:
    """The (B, Hkv, S, D) tensor under HF's ``repeat_kv`` (reshape <- expand <- unsqueeze(2)), else ``node``."""
    if node.op == "call_function" and node.target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        e = node.args[0]
        if e.op == "call_function" and e.target is aten.expand.default:
            u = e.args[0]
            if u.op == "call_function" and u.target is aten.unsqueeze.default and u.args[1] == 2:
                return u.args[0]
    return node


def strip_repeat_kv(node: fx.Node, n_kv_heads: int) -> fx.Node:
    """:func:`under_repeat_kv`, checked to have ``n_kv_heads`` heads (an AccelcError otherwise)."""
    cur = under_repeat_kv(node)
    v = cur.meta.get("val")
    if v is not None and v.shape[1] != n_kv_heads:
        raise AccelcError(
            "pass lift_attention",
            f"could not find the {n_kv_heads} KV heads under {node.name} (found {v.shape[1]} heads)",
            "the attention's key/value plumbing does not match HF's repeat_kv pattern",
        )
    return cur


def replace_with_attention(gm: fx.GraphModule, site: SDPASite, k: fx.Node, v: fx.Node, scale: float, window: int = 0) -> fx.Node:
    """Insert ``accelc.attention(q, k, v, scale[, window])`` in place of ``site.node``; returns the new node."""
    args = (site.query, k, v, float(scale)) + ((int(window),) if window else ())
    with gm.graph.inserting_before(site.node):
        new = call(gm, torch.ops.accelc.attention.default, args, like=site.node)
    site.node.replace_all_uses_with(new)
    gm.graph.erase_node(site.node)
    return new


@register_pass
class LiftAttention(Pass):
    """Lift every attention site of a captured model (see the module docstring)."""

    name = "lift_attention"
    stage = "lift"
    requires = ("canonical",)
    provides = ("attention_lifted",)

    def apply(self, program: Program, ctx: PassContext) -> Outcome:
        gm, info = program.gm, program.info
        sites = [SDPASite.of(n) for n in calls(gm, aten.scaled_dot_product_attention.default)]
        if not sites:
            raise AccelcError(
                "pass lift_attention", "found no scaled_dot_product_attention in the captured graph",
                "load the model with attn_implementation='sdpa' (accelc's loaders do this)",
            )
        layers = []
        for site in sites:
            if site.dropout_p:
                raise AccelcError("pass lift_attention", f"{site.node.name} uses dropout", "compile the model in eval mode")
            layer = layer_of(site.node)
            if layer is None:
                raise AccelcError("pass lift_attention", f"cannot tell which layer {site.node.name} belongs to", "no model.layers.N in its module stack")
            k0 = strip_repeat_kv(site.key, info.n_kv_heads)
            v0 = strip_repeat_kv(site.value, info.n_kv_heads)
            scale = site.scale if site.scale is not None else info.head_dim ** -0.5
            new = replace_with_attention(gm, site, k0, v0, scale, info.window(layer))
            new.meta["accelc_layer"] = layer
            layers.append(layer)
        gm.graph.eliminate_dead_code()
        if sorted(layers) != list(range(info.n_layers)):
            raise AccelcError("pass lift_attention", f"found attention in layers {sorted(layers)}, expected 0..{info.n_layers - 1}")
        notes = [f"{len(sites)} attention sites lifted (GQA {info.n_heads}/{info.n_kv_heads} heads)"]
        windowed = {l: info.window(l) for l in sorted(layers) if info.window(l)}
        if windowed:
            notes.append(f"sliding-window layers {sorted(windowed)} (window {', '.join(sorted({str(w) for w in windowed.values()}))})")
        return Outcome(len(sites), tuple(notes))


def _shape(node: Any) -> tuple | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def causal_sdpa_heads(site: SDPASite) -> tuple[fx.Node, fx.Node] | None:
    """(k, v) with Hkv heads if ``site`` is provably plain causal attention of a whole sequence, else None.

    Provable means: no mask, ``is_causal=True``, no dropout, 4-d q/k/v whose key length equals the
    query length and whose head dims agree (symbolic sizes must be equal by construction, not by
    a guess), and a query head count that the key/value head count divides.
    """
    if site.attn_mask is not None or not site.is_causal or site.dropout_p:
        return None
    k, v = under_repeat_kv(site.key), under_repeat_kv(site.value)
    qs, ks, vs = _shape(site.query), _shape(k), _shape(v)
    if qs is None or ks is None or vs is None or not (len(qs) == len(ks) == len(vs) == 4):
        return None
    same = (qs[0] == ks[0], ks[0] == vs[0], qs[2] == ks[2], ks[2] == vs[2], qs[3] == ks[3], ks[3] == vs[3], ks[1] == vs[1])
    if not all(statically_known_true(c) for c in same):
        return None
    if not all(isinstance(x, int) for x in (qs[1], ks[1], qs[3])) or qs[1] % ks[1]:
        return None
    return k, v


class LiftCausalSDPA(Pass):
    """Lift the provably causal whole-sequence SDPA sites of a graph Dynamo hands over.

    Not registered: ``accelc.compile`` plans never include it; :mod:`accelc.backend` runs it.
    Sites it cannot prove causal stay ATen SDPA (counted in the notes), so results never change.
    """

    name = "lift_causal_sdpa"
    stage = "lift"
    requires = ("canonical",)
    provides = ("attention_lifted",)

    def apply(self, program: Program, ctx: PassContext) -> Outcome:
        gm = program.gm
        lifted, kept = 0, 0
        for node in calls(gm, aten.scaled_dot_product_attention.default):
            site = SDPASite.of(node)
            kv = causal_sdpa_heads(site)
            if kv is None:
                kept += 1
                continue
            scale = site.scale if site.scale is not None else _shape(site.query)[3] ** -0.5
            replace_with_attention(gm, site, *kv, scale)
            lifted += 1
        gm.graph.eliminate_dead_code()
        return Outcome(lifted, (f"{lifted} causal attention sites lifted, {kept} left as ATen SDPA (masked, cached or windowed)",))


__all__ = ["LiftAttention", "LiftCausalSDPA", "SDPASite", "causal_sdpa_heads", "strip_repeat_kv", "under_repeat_kv", "ops"]
