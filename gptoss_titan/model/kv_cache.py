"""Key/value cache for decoding.

Shape legend: B batch, G kv heads, S cached keys, T new tokens, D head dim, W window.

Full-attention layers keep every position (capacity = the longest sequence asked for); sliding
layers keep a ring of W slots, so their memory does not grow with the generated length. Each slot
records the absolute position of its key, and the attention mask is built from positions, so the
order of slots never matters and RoPE (applied before caching) stays correct past the window.
"""

from __future__ import annotations

import torch


class LayerCache:
    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, ring: bool,
                 dtype: torch.dtype, device: torch.device | str):
        self.ring, self.capacity = ring, capacity
        self.k = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)  # [B, G, S, D]
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((capacity,), -1, dtype=torch.long, device=device)  # [S] absolute position, -1 = empty

    def append_one(self, k_new: torch.Tensor, v_new: torch.Tensor, position: int):
        """Decode step (one token): store it, return views of the filled slots and their positions."""
        slot = position % self.capacity if self.ring else position
        if not self.ring and slot >= self.capacity:
            raise ValueError(f"position {position} is beyond the cache capacity {self.capacity}")
        self.k[:, :, slot] = k_new[:, :, 0]
        self.v[:, :, slot] = v_new[:, :, 0]
        self.pos[slot] = position
        n = min(position + 1, self.capacity)  # slots fill in order from 0 (prefill starts at 0)
        return self.k[:, :, :n], self.v[:, :, :n], self.pos[:n]

    def extend(self, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor):
        """Keys/values to attend to (cached + new, [B, G, S', D]) and their positions [S']; then store the new ones."""
        valid = self.pos >= 0
        k_all = torch.cat([self.k[:, :, valid], k_new], dim=2)
        v_all = torch.cat([self.v[:, :, valid], v_new], dim=2)
        k_pos = torch.cat([self.pos[valid], positions])
        n = min(k_new.shape[2], self.capacity) if self.ring else k_new.shape[2]
        if not self.ring and int(positions[-1]) >= self.capacity:
            raise ValueError(f"position {int(positions[-1])} is beyond the cache capacity {self.capacity}")
        slots = positions[-n:] % self.capacity if self.ring else positions[-n:]
        self.k[:, :, slots] = k_new[:, :, -n:]
        self.v[:, :, slots] = v_new[:, :, -n:]
        self.pos[slots] = positions[-n:]
        return k_all, v_all, k_pos


class KVCache:
    """One LayerCache per block; `Transformer.forward(tokens, cache=..., start_pos=...)` fills it."""

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers

    def memory_bytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() * 2 for c in self.layers)
