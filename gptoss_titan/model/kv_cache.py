"""Key/value cache for decoding, with static shapes.

Shape legend: B batch, G kv heads, C cache slots, T new tokens, D head dim, W window.

Full-attention layers keep every position (C = the longest sequence asked for); sliding layers
keep a ring of W slots, so their memory does not grow with the generated length. Each slot
records the absolute position of its key (-1 = empty) and attention masks are built from
positions, so the order of slots never matters and RoPE (applied before caching) stays correct
past the window. Writes go to slots computed from position tensors (`index_copy_`) and reads see
every slot, so a decode step has the same shapes at every position: one compiled graph serves
them all.
"""

from __future__ import annotations

import torch


class LayerCache:
    def __init__(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        ring: bool,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.ring, self.capacity = ring, capacity
        self.k = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)  # [B, G, C, D]
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full(
            (capacity,), -1, dtype=torch.long, device=device
        )  # [C] absolute position, -1 = empty

    def write(self, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor) -> None:
        """Store new keys/values [B, G, T, D] at positions [T] (ascending): ring layers keep the last C."""
        n = min(k_new.shape[2], self.capacity)
        k_new, v_new, positions = k_new[:, :, -n:], v_new[:, :, -n:], positions[-n:]
        slots = positions % self.capacity if self.ring else positions  # [n]
        self.k.index_copy_(2, slots, k_new.to(self.k.dtype))
        self.v.index_copy_(2, slots, v_new.to(self.v.dtype))
        self.pos.index_copy_(0, slots, positions)


class KVCache:
    """One LayerCache per block; `Transformer.forward(tokens, cache=..., start_pos=...)` fills it.

    `empty` is True until the first forward (the prompt's prefill), which then attends to its own
    keys only, with the training kernels; later forwards attend to the cached slots.
    """

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers
        self.empty = True
