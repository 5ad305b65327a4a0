"""Rollouts: G completions per prompt from the current training weights, with the KV cache.

Shape legend: G completions per prompt, T0 prompt tokens, n new tokens, N = prompts x G, L the
longest prompt + completion of the batch.

Prompts of the same token length decode together, each repeated G times (one prefill, then one
token per step through the model's own forward, model/kv_cache.py; at most rl.generation_batch
rows at once), in eval mode (no adapter dropout) and without gradients. Each data-parallel rank samples its own prompts with its own generator,
seeded by (training.seed, step, data-parallel rank): a resumed run draws the same samples. Under
FSDP or expert parallelism every forward is collective, so the ranks agree each step whether all
of them are done (one all-reduce of a flag) and run the same number of forwards.

The log-probabilities decoding saw are kept only to measure how far they are from the trainer's
forward on the same tokens (`logprob_diff_max`): a one-row decode step runs differently shaped
kernels (other summation orders) than the batched training forward. The ratio's old log-probs
come from the trainer's forward itself (train/rl_step.py), so they equal the trained ones exactly.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..infer.generate import compile_ready, compiled_decode_step, decode_step, is_sharded, sample_next
from ..model.local import to_device
from ..model.tokens import CALL_ID, EOT_ID, RETURN_ID
from .prompts import Prompt

STOPS = (RETURN_ID, CALL_ID, EOT_ID)


@dataclass
class Rollout:
    """A rank's completions, on the host."""

    prompts: list[Prompt]  # one per group
    tokens: torch.Tensor  # [N, L] prompt + completion, padded with <|endoftext|>
    prompt_lens: list[int]  # [N]
    completion_lens: list[int]  # [N] sampled tokens, the stop token included
    decode_logprobs: torch.Tensor  # [N, L - 1] fp32, aligned with the targets (0 outside completions)
    truncated: list[bool]  # [N] no stop token within rl.max_new_tokens
    seconds: float  # wall time of the sampling (the host copies of its results included)

    def completion(self, i: int) -> list[int]:
        p = self.prompt_lens[i]
        return self.tokens[i, p : p + self.completion_lens[i]].tolist()

    def target_mask(self) -> torch.Tensor:
        """[N, L - 1]: target j (token j + 1) is a sampled token."""
        j = torch.arange(self.tokens.shape[1] - 1)
        p = torch.tensor(self.prompt_lens).unsqueeze(1)
        c = torch.tensor(self.completion_lens).unsqueeze(1)
        return (j >= p - 1) & (j < p - 1 + c)


def sampling_seed(seed: int, step: int, dp_rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, dp_rank]).generate_state(1, np.uint64)[0] >> 1)


def _all_done(done: torch.Tensor, world: bool) -> bool:
    flag = done.all().to(torch.int32)
    if world:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


@torch.no_grad()
def sample_rows(
    model, rows: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
    generator: torch.Generator, device: torch.device, dtype: torch.dtype | None = None, compiled: bool = False,
    max_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Prompts of one length [R, T0] -> (tokens [R, n], decode log-probs [R, n], lengths [R]);
    lengths count up to the first stop token, inclusive (n: the longest, or max_new_tokens).
    compiled: decode steps through torch.compile (static shapes: the cache's capacity is rounded
    up to a power of two, at most max_len, so prompts of nearby lengths share one graph)."""
    world = dist.is_initialized() and dist.get_world_size() > 1
    x = to_device(torch.tensor(rows), device)  # [R, T0]
    R, T0 = x.shape
    positions = torch.arange(T0, T0 + max_new_tokens, device=device)  # each decode step's, made once
    capacity = T0 + max_new_tokens
    if compiled:  # one capacity for nearby prompt lengths: one graph
        capacity = max(capacity, min(1 << (capacity - 1).bit_length(), max_len or model.args.max_seq_len))
    step = compiled_decode_step() if compiled else decode_step
    cache = model.new_cache(R, capacity, dtype)
    logits = model(x, cache=cache, start_pos=0, last_only=True)[:, -1]  # [R, V]
    stops = torch.tensor(STOPS, device=device)
    done = torch.zeros(R, dtype=torch.bool, device=device)
    lengths = torch.full((R,), max_new_tokens, dtype=torch.long, device=device)
    out, logps = [], []
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, 0, top_p, generator)  # [R]
        logp = torch.log_softmax(logits.float() / temperature, -1).gather(1, nxt.unsqueeze(1)).squeeze(1)
        nxt = torch.where(done, EOT_ID, nxt)  # rows already stopped: padding
        out.append(nxt)
        logps.append(logp * ~done)
        hit = torch.isin(nxt, stops) & ~done
        lengths = torch.where(hit, i + 1, lengths)
        done |= hit
        if i + 1 == max_new_tokens or _all_done(done, world):
            break
        logits = step(model, nxt.unsqueeze(1), positions[i], cache)
    return torch.stack(out, 1), torch.stack(logps, 1), lengths


def _batches(prompts: list[Prompt], group_size: int, max_rows: int) -> list[list[int]]:
    """Prompt indices decoded together: prompts of one token length (no padding in the cache),
    at most max(max_rows // group_size, 1) prompts per batch."""
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p.tokens), []).append(i)
    per = max(max_rows // group_size, 1)
    return [idx[s : s + per] for idx in by_len.values() for s in range(0, len(idx), per)]


def rollout(
    model, prompts: list[Prompt], group_size: int, max_new_tokens: int, temperature: float, top_p: float,
    seed: int, device: torch.device, autocast, max_rows: int = 64, dtype: torch.dtype | None = None,
    compiled: bool = False, max_len: int | None = None,
) -> Rollout:  # fmt: skip
    """Every prompt's G completions (prompt order, completions of a prompt in a row). Under
    torch.distributed every rank runs as many batches as the rank with the most (extra ones: a
    one-row batch whose output is dropped), since each forward is collective. dtype: the compute
    dtype, the KV cache's (None: the parameters'). compiled: decode steps through torch.compile, on
    an unsharded model (a sharded one decodes eagerly); max_len: the longest prompt + completion
    (training.seq_len), which the compiled path's rounded-up cache capacity stays within."""
    t0 = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(seed)
    batches = _batches(prompts, group_size, max_rows)
    n_batches = len(batches)
    if dist.is_initialized() and dist.get_world_size() > 1:
        n = torch.tensor(n_batches, device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        n_batches = int(n)
    was_training = model.training
    model.eval()
    got: dict[int, tuple] = {}
    compiled = compiled and not is_sharded(model)
    kernel_dtype = dtype or next(model.parameters()).dtype
    ready = compile_ready(model, device.type, kernel_dtype) if compiled else contextlib.nullcontext()
    try:
        with autocast, ready:
            for b in range(n_batches):
                idx = batches[b] if b < len(batches) else []
                rows = [prompts[i].tokens for i in idx for _ in range(group_size)] or [prompts[0].tokens]
                toks, logp, lengths = sample_rows(
                    model, rows, max_new_tokens, temperature, top_p, gen, device, dtype, compiled, max_len
                )
                toks, logp, lengths = toks.cpu(), logp.float().cpu(), lengths.cpu()
                for k, i in enumerate(idx):
                    got[i] = tuple(x[k * group_size : (k + 1) * group_size] for x in (toks, logp, lengths))
    finally:
        model.train(was_training)
    seqs, lps, plens, clens, trunc = [], [], [], [], []
    for i, p in enumerate(prompts):
        toks, logp, lengths = got[i]
        for g in range(group_size):
            n = int(lengths[g])
            seqs.append(p.tokens + toks[g, :n].tolist())
            lps.append(logp[g, :n])
            plens.append(len(p.tokens))
            clens.append(n)
            trunc.append(int(toks[g, n - 1]) not in STOPS)
    L = max(len(r) for r in seqs)
    tokens = torch.full((len(seqs), L), EOT_ID, dtype=torch.long)
    decode = torch.zeros(len(seqs), L - 1)
    for i, r in enumerate(seqs):
        tokens[i, : len(r)] = torch.tensor(r)
        decode[i, plens[i] - 1 : plens[i] - 1 + clens[i]] = lps[i]
    return Rollout(prompts, tokens, plens, clens, decode, trunc, time.perf_counter() - t0)
