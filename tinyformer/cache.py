"""The KV cache of generation: every self-attention layer's keys and values, preallocated for the whole sequence
(gpt-fast's static cache: a decode step writes one position in place, so its shapes stay fixed but for the cached
length), and the cross-attention keys and values of an encoder memory, computed once.

Legend: B batch, Hkv key/value heads, Dh head dim.
"""
from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys and values of every self-attention layer (`layers`, one `LayerCache` each), plus the
    cross-attention keys and values of the encoder memory (computed once). `length` counts the positions written."""

    def __init__(self, n_kv_heads: list[int], batch: int, max_len: int, head_dim: int, dtype, device):
        # one head count per layer: structured pruning leaves layers with different counts
        self.layers = [LayerCache(self, batch, h, max_len, head_dim, dtype, device) for h in n_kv_heads]
        self.max_len, self.length = max_len, 0

    def reorder(self, index, cross: bool = True):
        """Row i becomes row index[i] (beam search), for the positions written so far, in place. cross=False leaves
        the cross-attention keys and values alone: right when every row of `index` has the same encoder memory as
        the row it replaces (the beams of one source)."""
        for layer in self.layers:
            for t in (layer.k, layer.v):
                t[:, :, :self.length] = t[index, :, :self.length]  # (B, Hkv, length, Dh)
            if cross and layer.cross is not None:
                layer.cross = tuple(t.index_select(0, index) for t in layer.cross)


class LayerCache:
    """One layer's share of a KVCache: its keys and values k, v (B, Hkv, max_len, Dh), and `cross`, the keys and
    values of the encoder memory once computed."""

    def __init__(self, cache: KVCache, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype, device):
        self.cache, self.cross = cache, None
        self.k = torch.zeros(batch, n_kv_head, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, n_kv_head, max_len, head_dim, dtype=dtype, device=device)

    def update(self, k, v):
        """Write k, v (B, Hkv, T, Dh) at positions length..length+T-1; return every key and value so far."""
        start = self.cache.length
        end = start + k.shape[2]
        if end > self.cache.max_len:
            raise ValueError(f"KV cache holds {self.cache.max_len} positions; writing up to {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, Hkv, end, Dh)
