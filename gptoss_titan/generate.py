"""Sampling from a model (used for the trainer's periodic text samples).

This version recomputes the whole sequence for every new token; it is exact but O(T^2).
"""

from __future__ import annotations

import torch

from .model import Transformer


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next ids [B]. temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # [B, V]
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             stop_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """prompt [B, T0] -> [B, T0 + n] (n <= max_new_tokens; stops early when every row hit a stop id)."""
    gen = torch.Generator(device=prompt.device).manual_seed(seed) if seed is not None else None
    seq = prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        window = seq[:, -model.args.max_seq_len :]
        nxt = sample_next(model(window)[:, -1], temperature, top_k, top_p, gen)  # [B]
        seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
        if stop_ids:
            done |= torch.isin(nxt, torch.tensor(stop_ids, device=nxt.device))
            if bool(done.all()):
                break
    return seq
