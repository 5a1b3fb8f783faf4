"""sparse_attention: streaming heads, block-sparse prefill and Quest page selection, per layer/head.

- Streaming heads (Xiao et al. 2024 "StreamingLLM"; Xiao et al. 2025 "DuoAttention"): a head sees
  only the first ``sink`` and the last ``local`` tokens.  With ``heads: all`` the layer's cache
  itself keeps only sink + local entries (the runtime evicts the rest, so memory drops);
  with a head list (whole GQA groups) or ``heads: auto`` (KV heads whose attention mass on
  sink + local exceeds AUTO_MASS on a calibration text and on the question of a passkey prompt,
  measured once and cached on disk, see :func:`calibrate_streaming_heads`) the
  masking is per KV head and the cache stays whole.
- Block-sparse prefill (Jiang et al. 2024 "MInference"; Yang et al. 2025 "LServe"): each query
  block attends to its sink, local and ``top_blocks`` best key blocks (mean-pooled q·k); prefill
  graph only.
- Quest (Tang et al. 2024): per-page key min/max kept by the runtime cache; decode attends only to
  the ``top_pages`` pages whose bound on q·k is highest.

Before::                                          After (streaming / quest layers, main + prefill graphs)::
    o = accelc.cached_attention(q, k, v, kc_i, ...)   o = accelc.cached_sparse_attention(q, k, v, kc_i, ..., k_min_i, k_max_i,
                                                                                      sink, local, stream_heads, page, top_pages)
                                                  After (block_sparse layers, prefill graph)::
                                                      o = accelc.cached_block_sparse_attention(q, k, v, kc_i, ..., block, top_blocks, ...)

Entries may overlap on a layer when they do not conflict: streaming *heads* (a list / auto) +
Quest on the remaining heads (LServe), or block-sparse prefill + Quest decode.  Whole-layer
streaming with anything else, streaming + block-sparse, or the same method twice on a layer, is an
error naming both entries.  So is an entry on a sliding-window layer (Gemma 3's local layers): its
window already limits what it reads, and these patterns are defined over the whole context.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from accelc.errors import AccelcError
from accelc.fx_utils import add_placeholder, call, calls
from accelc.pass_manager import Outcome, Pass, PassContext, Program, register_pass

AUTO_MASS = 0.9          # heads: auto -> a KV head streams when >= 90% of its attention lands on sink + local
CALIBRATION_TOKENS = 1024


@dataclass
class LayerPlan:
    """What one layer's attention becomes."""

    streaming: tuple[int, int] | None = None          # (sink, local)
    stream_heads: list[bool] | None = None            # per KV head; None = all heads
    quest: tuple[int, int] | None = None               # (page, top_pages)
    block_sparse: tuple[int, int, int, int] | None = None  # (block, top_blocks, sink_blocks, local_blocks)
    entries: dict[str, int] = field(default_factory=dict)  # method -> entry index (for errors)


def kv_heads_of(heads: list[int], n_heads: int, n_kv: int, where: str) -> list[bool]:
    """Query-head indices -> per-KV-head flags; a KV head streams only if its whole group does."""
    group = n_heads // n_kv
    flags = []
    for g in range(n_kv):
        members = set(range(g * group, (g + 1) * group))
        inside = members & set(heads)
        if inside and inside != members:
            raise AccelcError(where, f"heads {sorted(inside)} share KV head {g} with heads {sorted(members - inside)}",
                              f"streaming heads must cover whole GQA groups of {group} query heads")
        flags.append(bool(inside))
    return flags


RETRIEVAL_QUERIES = 32  # the last tokens of the passkey calibration prompt (the question), whose attention retrieves


def _window_shares(model: torch.nn.Module, ids: torch.Tensor, layers: list[int], sink: int, local: int,
                   queries: slice) -> dict[int, list[float]]:
    """Per layer and KV head: the smallest, over the group's query heads, share of attention that the
    queries ``queries`` (positions) put on sink + local, averaged over those queries (eager attention)."""
    cfg = model.config
    n = ids.shape[1]
    i = torch.arange(n)[queries, None]
    j = torch.arange(n)[None, :]
    window = (j < sink) | (j > i - local)
    n_kv = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    group = cfg.num_attention_heads // n_kv
    mass: dict[int, list[float]] = {}

    def hook(layer):
        def fn(_mod, _inp, out):
            w = out[1][:, :, queries]  # (1, H, q, n)
            share = (w * window).sum(-1).mean(-1)[0]  # (H,)
            mass[layer] = share.view(n_kv, group).min(1).values.tolist()
        return fn

    hooks = [model.model.layers[l].self_attn.register_forward_hook(hook(l)) for l in layers]
    try:
        with torch.inference_mode():
            model(ids, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    return mass


def calibrate_streaming_heads(model: torch.nn.Module, layers: list[int], sink: int, local: int, tokenizer=None) -> dict[int, list[float]]:
    """Per layer and KV head: the share of attention that stays on sink + local where it matters.

    Two eager runs (training-free, in the spirit of DuoAttention's retrieval/streaming split):
    (1) a calibration text (Python's pydoc topics), averaged over the queries the window does not
    already cover (positions >= sink + local); (2) with a tokenizer, a passkey prompt of
    CALIBRATION_TOKENS tokens (:func:`accelc.bench.passkey_trial`, fixed seed), averaged over its
    last RETRIEVAL_QUERIES tokens -- the question, whose heads that fetch the key from far back are
    retrieval heads.  A KV head's share is the smaller of the two, so a head that language
    modelling leaves local but retrieval needs is not made streaming.  Cached on disk.
    """
    from accelc.bench import corpus_text, passkey_trial
    from accelc.models import cache_dir
    from accelc.runtime.engine import chat_ids

    cfg = model.config
    ident = hashlib.sha256(json.dumps([cfg.to_json_string(), sink, local, CALIBRATION_TOKENS, RETRIEVAL_QUERIES, 2,
                                       tokenizer is not None,
                                       float(next(model.parameters()).flatten()[:64].sum())]).encode()).hexdigest()[:16]
    path = cache_dir() / "calibration" / f"streaming-{ident}.json"
    if path.exists():
        data = json.loads(path.read_text())
        return {int(k): v for k, v in data.items()}
    text_ids = tokenizer.encode(corpus_text(), add_special_tokens=False)[:CALIBRATION_TOKENS] if tokenizer is not None else []
    if len(text_ids) == CALIBRATION_TOKENS and max(text_ids) < cfg.vocab_size:
        ids = torch.tensor([text_ids])
    else:  # no tokenizer (or a toy vocabulary): seeded random tokens
        ids = torch.randint(3, cfg.vocab_size, (1, CALIBRATION_TOKENS), generator=torch.Generator().manual_seed(0))
    runs = [(ids, slice(min(sink + local, ids.shape[1] - 1), None))]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        p_ids = chat_ids(tokenizer, passkey_trial(tokenizer, CALIBRATION_TOKENS, 0.5, seed=12345).text)
        if max(p_ids) < cfg.vocab_size:
            runs.append((torch.tensor([p_ids]), slice(-RETRIEVAL_QUERIES, None)))
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        shares = [_window_shares(model, run_ids, layers, sink, local, queries) for run_ids, queries in runs]
    finally:
        model.set_attn_implementation(prev)
    mass = {l: [min(vals) for vals in zip(*(sh[l] for sh in shares))] for l in layers}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(mass))
    tmp.replace(path)
    return mass


@register_pass
class SparseAttention(Pass):
    name = "sparse_attention"
    feature = "sparse_attention"
    requires = ("kv_cache",)
    provides = ("sparse_attention",)

    def plan(self, program: Program, ctx: PassContext) -> dict[int, LayerPlan]:
        info = program.info
        plans: dict[int, LayerPlan] = {}
        for i, e in enumerate(self.spec.attention.sparse):
            where = f"spec attention.sparse[{i}]"
            for l in e.layers.resolve(info.n_layers, where=f"attention.sparse[{i}].layers"):
                p = plans.setdefault(l, LayerPlan())
                if e.method in p.entries:
                    raise AccelcError(where, f"layer {l} already has a {e.method} entry (attention.sparse[{p.entries[e.method]}])",
                                      "give each layer at most one entry per method")
                p.entries[e.method] = i
                if e.method == "streaming":
                    p.streaming = (e.sink, e.local)
                    if e.heads == "all":
                        p.stream_heads = None
                    elif e.heads == "auto":
                        p.stream_heads = "auto"  # resolved below
                    else:
                        p.stream_heads = kv_heads_of(list(e.heads), info.n_heads, info.n_kv_heads, f"{where}.heads")
                elif e.method == "quest":
                    p.quest = (e.page, e.top_pages)
                elif e.method == "block_sparse":
                    p.block_sparse = (e.block, e.top_blocks, e.sink_blocks, e.local_blocks)
        windowed = sorted(l for l in plans if info.window(l))
        if windowed:
            entries = sorted({i for l in windowed for i in plans[l].entries.values()})
            full = [l for l in range(info.n_layers) if not info.window(l)]
            raise AccelcError(
                "spec attention.sparse",
                f"layers {', '.join(map(str, windowed))} attend through a sliding window "
                f"({', '.join(f'attention.sparse[{i}]' for i in entries)} {'asks' if len(entries) == 1 else 'ask'} for them)",
                "a sliding-window layer reads only its last window of tokens already, and streaming/quest/block_sparse "
                f"select over the whole context; list full-attention layers only: {', '.join(map(str, full)) or 'none'}",
            )
        for l, p in plans.items():
            names = ", ".join(f"attention.sparse[{i}] ({m})" for m, i in p.entries.items())
            if p.streaming and p.block_sparse:
                raise AccelcError(f"spec attention.sparse", f"layer {l}: streaming and block_sparse conflict ({names})",
                                  "both define the layer's prefill attention; keep one")
            if p.streaming and p.stream_heads is None and p.quest:
                raise AccelcError(f"spec attention.sparse", f"layer {l}: streaming on all heads and quest conflict ({names})",
                                  "give streaming a head list (or heads: auto) so Quest serves the other heads")
        comp = self.spec.kv_cache.compression if self.spec.kv_cache else None
        if comp is not None:
            for l in comp.layers.resolve(info.n_layers, where="kv_cache.compression.layers"):
                p = plans.get(l)
                if p and (p.quest or (p.streaming and p.stream_heads is None)):
                    raise AccelcError("spec kv_cache.compression", f"layer {l} is also a {'quest' if p.quest else 'streaming'} layer",
                                      "KV compression rewrites the cache those methods index; exclude the layer from one of them")
        auto = sorted(l for l, p in plans.items() if p.stream_heads == "auto")
        if auto:
            if ctx.model is None:
                raise AccelcError("spec attention.sparse", "heads: auto needs the model for calibration", "compile with a model")
            sink, local = plans[auto[0]].streaming
            mass = calibrate_streaming_heads(ctx.model, auto, sink, local, ctx.tokenizer)
            for l in auto:
                plans[l].stream_heads = [m >= AUTO_MASS for m in mass[l]]
        return plans

    def apply(self, program: Program, ctx: PassContext) -> Outcome:
        plans = self.plan(program, ctx)
        info = program.info
        decode_layers = {l: p for l, p in plans.items() if p.streaming or p.quest}
        prefill_layers = {l: p for l, p in plans.items() if p.block_sparse}
        # The prefill graph (if any, or if block-sparse needs one) is rewritten from plain attention:
        # block-sparse where asked, the decode-time pattern elsewhere.
        prefill = program.prefill_graph() if prefill_layers else program.graphs.get("prefill")
        n = self._rewrite(program.gm, decode_layers, info)
        if prefill is not None:
            n += self._rewrite(prefill, plans, info)
        program.meta["quest"] = {l: p.quest[0] for l, p in plans.items() if p.quest}
        program.meta["streaming_evict"] = {l: p.streaming for l, p in plans.items() if p.streaming and p.stream_heads is None}
        heads = {l: p.stream_heads for l, p in plans.items() if p.streaming and p.stream_heads is not None}
        notes = [f"{len(decode_layers)} layers with streaming/quest attention, {len(prefill_layers)} with block-sparse prefill",
                 f"whole-layer streaming (cache keeps sink+local): {sorted(program.meta['streaming_evict'])}"]
        if heads:
            notes.append("streaming KV heads per layer: " + ", ".join(f"{l}:{[i for i, f in enumerate(h) if f]}" for l, h in sorted(heads.items())))
        return Outcome(n, tuple(notes))

    def _rewrite(self, gm: fx.GraphModule, layers: dict[int, LayerPlan], info) -> int:
        n = 0
        placeholders = {p.target: p for p in gm.graph.nodes if p.op == "placeholder"}
        for attn in calls(gm, torch.ops.accelc.cached_attention.default):
            l = attn.meta.get("accelc_layer")
            p = layers.get(l)
            if p is None:
                continue
            args = tuple(attn.args[:9])
            k_min = k_max = None
            if p.quest:
                k_min = placeholders.get(f"k_min_{l}") or add_placeholder(gm, f"k_min_{l}")
                k_max = placeholders.get(f"k_max_{l}") or add_placeholder(gm, f"k_max_{l}")
            if p.block_sparse:
                target = torch.ops.accelc.cached_block_sparse_attention.default
                extra = (*p.block_sparse, k_min, k_max, p.quest[0] if p.quest else 0)
            else:
                heads = None
                if p.streaming and p.stream_heads is not None:
                    name = f"_stream_heads_{l}"
                    gm.register_buffer(name, torch.tensor(p.stream_heads, dtype=torch.bool), persistent=False)
                    with gm.graph.inserting_before(attn):
                        heads = gm.graph.get_attr(name)
                sink, local = p.streaming if p.streaming else (-1, 0)
                page, top = p.quest if p.quest else (0, 0)
                if p.streaming and p.stream_heads is not None and not any(p.stream_heads):
                    sink, heads = -1, None  # auto found no streaming head here
                target = torch.ops.accelc.cached_sparse_attention.default
                extra = (k_min, k_max, sink, local, heads, page, top)
            with gm.graph.inserting_before(attn):
                new = call(gm, target, args + tuple(extra), like=attn)
            attn.replace_all_uses_with(new)
            gm.graph.erase_node(attn)
            n += 1
        return n
