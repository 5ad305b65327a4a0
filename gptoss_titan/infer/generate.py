"""Sampling from a model with a KV cache: one prefill of the prompt, then one token per step.

Sliding-window layers keep only their last 128 keys (a ring buffer); sinks and RoPE positions are
exactly as in training. The trainer's periodic samples use this code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from ..model import Transformer
from ..model.kv_cache import KVCache
from ..model.moe import compile_ready_kernel


def decode_step(model: Transformer, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One decode step through the model's own forward: tokens [B, 1] at position pos (0-d) -> [B, V]."""
    return model(tokens, cache=cache, start_pos=pos)[:, -1]


@functools.cache
def compiled_decode_step():
    """`decode_step` under torch.compile, built once per process (it recompiles per model and shape)."""
    return torch.compile(decode_step, fullgraph=True, dynamic=False)


def is_sharded(model: Transformer) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextmanager
def compile_ready(model: Transformer, device_type: str, dtype: torch.dtype) -> Iterator[None]:
    """Within the block, every expert kernel is one a fullgraph compile can trace (moe.py's
    compile_ready_kernel); the model's own kernels come back on exit."""
    kept = [block.moe.experts.kernel for block in model.blocks()]
    try:
        for block in model.blocks():
            block.moe.experts.kernel = compile_ready_kernel(block.moe.experts.kernel, device_type, dtype)
        yield
    finally:
        for block, kernel in zip(model.blocks(), kept):
            block.moe.experts.kernel = kernel


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
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
    return _draw(torch.softmax(logits, -1), generator)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of probs [B, V] by inverse transform: the first index whose cumulative
    probability (fp64) exceeds a uniform draw. Over a 201k vocabulary on CPU this is ~4x faster than
    torch.multinomial (which draws V exponentials per row); a zero-probability index is never drawn."""
    cdf = probs.double().cumsum(-1)  # [B, V]
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1).squeeze(1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: tuple[int, ...] = (),
    use_cache: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """prompt [B, T0] -> [B, T0 + n] (n <= max_new_tokens; stops early when every row hit a stop id).

    use_cache=False recomputes the whole sequence for every token (the reference for tests).
    Under torch.distributed (a sharded model), every rank runs the forward passes, rank 0 samples
    and broadcasts each token, so all ranks see the same tokens and stop together.
    on_token(next_ids [B]) is called after each step (for streaming output).

    Decoding runs the model's own forward on the cache with the position as a tensor, so every
    step has the same shapes; compile=True (an unsharded model) runs it through torch.compile,
    which pays a one-time compile of tens of seconds for a several-fold faster step. A sharded
    model (FSDP / expert parallel) runs eagerly; its hooks gather the parameters.
    """
    gen = torch.Generator(device=prompt.device).manual_seed(seed) if seed is not None else None
    total = prompt.shape[1] + max_new_tokens
    if total > model.args.max_seq_len:
        raise ValueError(
            f"prompt + new tokens = {total} exceeds the model's context {model.args.max_seq_len}"
        )
    cache = model.new_cache(prompt.shape[0], total) if use_cache else None
    seq = prompt
    logits = (
        model(prompt, cache=cache, start_pos=0, last_only=True)[:, -1] if use_cache else model(prompt)[:, -1]
    )
    compiled = compile and not is_sharded(model)
    step = compiled_decode_step() if compiled else decode_step
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    ready = compile_ready(model, prompt.device.type, next(model.parameters()).dtype)
    with ready if compiled else nullcontext():
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, gen)  # [B]
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast(nxt, src=0)
            if on_token is not None:
                on_token(nxt)
            seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
            if stop_ids:
                done |= torch.isin(nxt, torch.tensor(stop_ids, device=nxt.device))
                if bool(done.all()):
                    break
            if seq.shape[1] == total:
                break
            if use_cache:  # the new token at its position, on the cache the prefill filled
                pos = torch.tensor(seq.shape[1] - 1, device=seq.device)
                logits = step(model, nxt.unsqueeze(1), pos, cache)
            else:
                logits = model(seq)[:, -1]
    return seq
