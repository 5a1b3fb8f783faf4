"""The runtime-owned KV cache: per layer keys, values and filled lengths.

Layer i holds ``k[i], v[i]: (B, Hkv, capacity_i, D)`` and ``lens[i]: (B,) int64`` — the number
of filled slots per row.  The compiled graph writes new entries at ``[lens_i[b], lens_i[b] + S)``
and advances ``lens_i`` itself (see ``accelc::cached_attention``).  Lengths may differ per layer
(token selection and KV compression store fewer entries in some layers) and per row (batches of
prompts of different lengths).  Rolling back rejected speculative tokens only resets lengths:
nothing is copied.  A sliding-window layer also holds ``k_pos[i]: (B, Hkv, capacity_i) int64``,
the token position of every slot (written by the graph with the keys), because its window is
measured in positions and a thinned cache's slots are not positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from accelc.capture import ModelInfo


@dataclass
class CacheSnapshot:
    """Saved per-layer lengths, for rollback."""

    lens: list[torch.Tensor]


class KVCache:
    def __init__(self, info: ModelInfo, batch: int, capacity: int, layers: list[int] | None = None,
                 pages: dict[int, int] | None = None, streaming: dict[int, tuple[int, int]] | None = None,
                 windows: dict[int, int] | None = None):
        self.info = info
        self.batch = batch
        self.layers = list(range(info.n_layers)) if layers is None else list(layers)
        shape = (batch, info.n_kv_heads, capacity, info.head_dim)
        self.k = {i: torch.zeros(shape, dtype=info.dtype, device=info.device) for i in self.layers}
        self.v = {i: torch.zeros(shape, dtype=info.dtype, device=info.device) for i in self.layers}
        self.lens = {i: torch.zeros(batch, dtype=torch.long, device=info.device) for i in self.layers}
        # Quest layers: per-page key min/max (B, Hkv, ceil(capacity / page), D), kept up to date by the graph.
        self.pages = dict(pages or {})
        self.k_min: dict[int, torch.Tensor] = {}
        self.k_max: dict[int, torch.Tensor] = {}
        for i in self.pages:
            self._alloc_pages(i)
        # Whole-layer streaming: the cache keeps the first `sink` and the last `local` entries.
        self.streaming = dict(streaming or {})
        # Sliding-window layers: the position of every slot (the graph writes it with the keys).
        self.windows = {i: w for i, w in (windows or {}).items() if i in self.k}
        self.k_pos = {i: torch.zeros(shape[:3], dtype=torch.long, device=info.device) for i in self.windows}
        self._inputs: dict[str, torch.Tensor] | None = None

    def _alloc_pages(self, i: int) -> None:
        page = self.pages[i]
        B, H, N, D = self.k[i].shape
        P = -(-N // page)
        old_min, old_max = self.k_min.get(i), self.k_max.get(i)
        self.k_min[i] = torch.full((B, H, P, D), float("inf"), device=self.k[i].device)
        self.k_max[i] = torch.full((B, H, P, D), float("-inf"), device=self.k[i].device)
        if old_min is not None:
            keep = min(P, old_min.shape[2])
            self.k_min[i][:, :, :keep] = old_min[:, :, :keep]
            self.k_max[i][:, :, :keep] = old_max[:, :, :keep]

    def inputs(self) -> dict[str, torch.Tensor]:
        """The graph inputs ``k_cache_i, v_cache_i, cache_len_i`` for every layer."""
        if self._inputs is None:
            d: dict[str, torch.Tensor] = {}
            for i in self.layers:
                d[f"k_cache_{i}"] = self.k[i]
                d[f"v_cache_{i}"] = self.v[i]
                d[f"cache_len_{i}"] = self.lens[i]
                if i in self.pages:
                    d[f"k_min_{i}"] = self.k_min[i]
                    d[f"k_max_{i}"] = self.k_max[i]
                if i in self.k_pos:
                    d[f"k_pos_{i}"] = self.k_pos[i]
            self._inputs = d
        return self._inputs

    def max_len(self) -> int:
        return max(int(t.max()) for t in self.lens.values())

    def ensure(self, extra: int, layers: list[int] | None = None) -> None:
        """Make room for ``extra`` more slots in every row of every layer (or of ``layers``;
        grows geometrically)."""
        for i in self.layers if layers is None else [i for i in layers if i in self.k]:
            need = int(self.lens[i].max()) + extra
            cap = self.k[i].shape[2]
            if need > cap:
                new_cap = max(need, 2 * cap)
                for store in (self.k, self.v):
                    old = store[i]
                    t = old.new_zeros((old.shape[0], old.shape[1], new_cap, old.shape[3]))
                    t[:, :, :cap].copy_(old)
                    store[i] = t
                if i in self.k_pos:
                    old = self.k_pos[i]
                    self.k_pos[i] = torch.cat([old, old.new_zeros((*old.shape[:2], new_cap - cap))], dim=2)
                if i in self.pages:
                    self._alloc_pages(i)
                self._inputs = None

    def trim(self, extra: int) -> None:
        """Shrink each layer's storage to its filled length + ``extra`` (after a compressing prefill)."""
        for i in self.layers:
            need = int(self.lens[i].max()) + extra
            if need < self.k[i].shape[2]:
                self.k[i] = self.k[i][:, :, :need].clone()
                self.v[i] = self.v[i][:, :, :need].clone()
                if i in self.k_pos:
                    self.k_pos[i] = self.k_pos[i][:, :, :need].clone()
                if i in self.pages:
                    self._alloc_pages(i)
                self._inputs = None

    def evict(self, slack: int | None = None) -> None:
        """Streaming layers: once a row holds more than sink + local + slack entries, keep the
        sink and the last ``local`` (slots stay in position order, so the streaming mask in slot
        space is the mask in position space).  slack=0 compacts fully (after prefill); the default
        (= local) amortises the copy to one entry per generated token."""
        for i, (sink, local) in self.streaming.items():
            limit = sink + local + (local if slack is None else slack)
            lens = self.lens[i]
            if not bool((lens > limit).any()):
                continue
            for b in (lens > limit).nonzero().flatten().tolist():
                n = int(lens[b])
                for store in (self.k, self.v):
                    store[i][b, :, sink : sink + local] = store[i][b, :, n - local : n].clone()
                lens[b] = sink + local

    def snapshot(self) -> CacheSnapshot:
        return CacheSnapshot([self.lens[i].clone() for i in self.layers])

    def restore(self, snap: CacheSnapshot, keep: torch.Tensor | None = None) -> None:
        """Reset lengths to ``snap`` (+ ``keep`` (B,) extra entries per row, e.g. accepted tokens).

        Kept entries are accepted tokens: they continue their row's sequence, so a sliding-window
        layer's kept slots get the positions after the snapshot's last entry (a tree verification
        wrote them at their node positions, and moving an accepted path into place moves keys and
        values only).
        """
        for i, saved in zip(self.layers, snap.lens):
            self.lens[i].copy_(saved if keep is None else saved + keep)
            if keep is not None and i in self.k_pos:
                self._renumber(self.k_pos[i], saved, keep)

    @staticmethod
    def _renumber(k_pos: torch.Tensor, start: torch.Tensor, count: torch.Tensor) -> None:
        """k_pos (B, Hkv, N): slots [start_b, start_b + count_b) <- the positions after slot start_b - 1."""
        width = int(count.max()) if count.numel() else 0
        if width == 0:
            return
        B, H, N = k_pos.shape
        step = torch.arange(width, device=k_pos.device)
        slots = (start[:, None] + step).clamp(max=N - 1)                                   # (B, width)
        prev = k_pos.gather(2, (start - 1).clamp(min=0)[:, None, None].expand(B, H, 1))   # (B, H, 1)
        write = ((step[None, :] < count[:, None]) & (start[:, None] > 0))[:, None, :]      # (B, 1, width)
        index = slots[:, None, :].expand(B, H, width)
        k_pos.scatter_(2, index, torch.where(write, prev + 1 + step, k_pos.gather(2, index)))

    def nbytes_used(self) -> int:
        """Bytes of filled KV entries (keys + values), summed over layers and rows."""
        per_slot = self.info.n_kv_heads * self.info.head_dim * torch.finfo(self.info.dtype).bits // 8 * 2
        return int(sum(int(l.sum()) for l in self.lens.values()) * per_slot)

    def nbytes_allocated(self) -> int:
        return int(sum(t.numel() * t.element_size() for s in (self.k, self.v) for t in s.values()))
