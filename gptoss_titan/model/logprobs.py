"""Per-token log-probabilities of given tokens through the lm_head, without full logits.

Shape legend: M rows (tokens), H hidden, V vocabulary, C rows per chunk.

Reinforcement learning needs log p(token) per token, with its gradient, and the policy's entropy
(a metric). Like the fused cross-entropy (loss.py) the rows go through the lm_head in chunks of
about `chunk_elems` logits, so [M, V] never exists. Unlike it, the gradient of each row depends on
the weight backward brings (advantages, clipping, masks), so backward computes each chunk's
logits again (one more GEMM) from the saved hidden states and log-sum-exps, instead of keeping
[M, H] and [V, H] gradients from forward.

A vocabulary split in parts (tensor parallelism's lm_head) works as in the fused cross-entropy:
w holds rows vocab_start .., and `combine` (loss.py's RowCombine) merges each chunk's row maxima
and its sums (of exponentials, of the target logit, of p (z - max) for the entropy) over the
parts, two collectives per chunk; backward needs none (each part's gradient to h is a partial
sum that the caller's gather reduces).

The log-probabilities are those of softmax(logits / temperature): the distribution sampling drew
from (top-p and top-k are not applied, as in TRL and verl). Entropy is of the same distribution
and carries no gradient.
"""

from __future__ import annotations

import torch

from ..runtime.compat import addmm_fp32_, mm_fp32_out
from ..runtime.dtypes import autocast_off
from .loss import CPU_CHUNK_ELEMS, IGNORE_INDEX, RowCombine, _compute_dtype, loss_path

ACCEL_CHUNK_ELEMS = 1 << 27  # 512 MiB of fp32 logits per chunk on accelerators


def _chunk_rows(V: int, path: str, chunk_elems: int | None) -> int:
    return max(1, (chunk_elems or (CPU_CHUNK_ELEMS if path == "cpu" else ACCEL_CHUNK_ELEMS)) // V)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, temperature, chunk_elems, path, vocab_start, combine):
        """h [M, H], w [V, H], targets [M] (IGNORE_INDEX: 0 out) -> (logprobs [M], entropy [M]),
        both fp32. No host synchronization: ignored rows are zeroed by arithmetic."""
        dt = _compute_dtype(h, path)
        with autocast_off(h.device.type):
            hc, wc = h.to(dt), w.to(dt)
            M, V = h.shape[0], w.shape[0]
            rows = _chunk_rows(V, path, chunk_elems)
            out = torch.empty(M, dtype=torch.float32, device=h.device)
            ent = torch.empty(M, dtype=torch.float32, device=h.device)
            lse_all = torch.empty(M, dtype=torch.float32, device=h.device)
            buf = torch.empty(min(rows, M), V, dtype=torch.float32, device=h.device)
            for s in range(0, M, rows):
                t = targets[s : s + rows]
                c = t.shape[0]
                valid = t != IGNORE_INDEX
                logits = buf[:c]
                mm_fp32_out(hc[s : s + c], wc.T, logits)
                if temperature != 1.0:
                    logits.div_(temperature)
                here = (t >= vocab_start) & (t < vocab_start + V)  # the target is in this part
                picked = logits.gather(1, (t - vocab_start).clamp(0, V - 1).unsqueeze(1)).squeeze(1) * here
                mx = logits.amax(dim=1, keepdim=True)
                if combine is not None:
                    mx = combine.max(mx)
                zm = logits.sub_(mx)  # [C, V] z - max, in place
                p = zm.exp()  # [C, V] unnormalized probabilities
                sums = torch.stack([p.sum(dim=1), p.mul_(zm).sum(dim=1), picked])  # [3, C]
                if combine is not None:
                    sums = combine.sum_rows(sums)
                sumexp, pzm, picked = sums
                lse = mx.squeeze(1) + sumexp.log()
                # entropy = lse - E[z] = log(sumexp) - sum(p (z - max)) / sumexp
                ent[s : s + c] = (sumexp.log() - pzm / sumexp) * valid
                out[s : s + c] = (picked - lse) * valid
                lse_all[s : s + c] = lse
        ctx.save_for_backward(h, w, targets, lse_all)
        # backward runs outside autocast: it reuses forward's compute dtype (same logits, same lse)
        ctx.temperature, ctx.chunk_elems, ctx.path, ctx.dt = temperature, chunk_elems, path, dt
        ctx.vocab_start = vocab_start
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, grad_out, _grad_ent):
        """d logp / d z = (onehot - softmax) / temperature, times each row's incoming weight."""
        h, w, targets, lse = ctx.saved_tensors
        temp, dt = ctx.temperature, ctx.dt
        need_h, need_w = ctx.needs_input_grad[:2]
        with autocast_off(h.device.type):
            hc, wc = h.to(dt), w.to(dt)
            M, V = h.shape[0], w.shape[0]
            rows = _chunk_rows(V, ctx.path, ctx.chunk_elems)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            buf = torch.empty(min(rows, M), V, dtype=torch.float32, device=h.device)
            for s in range(0, M, rows):
                t = targets[s : s + rows]
                c = t.shape[0]
                valid = t != IGNORE_INDEX
                coef = grad_out[s : s + c].float() * valid / temp  # [C]
                logits = buf[:c]
                mm_fp32_out(hc[s : s + c], wc.T, logits)
                if temp != 1.0:
                    logits.div_(temp)
                g = logits.sub_(lse[s : s + c].unsqueeze(1)).exp_()  # softmax [C, V]
                g.mul_(-coef.unsqueeze(1))
                here = (t >= ctx.vocab_start) & (t < ctx.vocab_start + V)
                g.scatter_add_(
                    1, (t - ctx.vocab_start).clamp(0, V - 1).unsqueeze(1), (coef * here).unsqueeze(1)
                )
                g = g.to(dt)
                if grad_h is not None:
                    grad_h[s : s + c] = (g @ wc).to(h.dtype)
                if grad_w is not None:
                    addmm_fp32_(grad_w, g.T, hc[s : s + c])
        gw = grad_w.to(w.dtype) if grad_w is not None else None
        return grad_h, gw, None, None, None, None, None, None


def token_logprobs(
    h: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_elems: int | None = None,
    path: str | None = None,
    vocab_start: int = 0,
    combine: RowCombine | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h [M, H], w [V, H], targets [M] -> (log softmax(h w^T / temperature)[target] [M], entropy
    [M]); rows whose target is IGNORE_INDEX give 0 in both. The log-probs carry gradients to h
    and w; the entropy none. path, chunk_elems, vocab_start and combine as in
    `fused_linear_cross_entropy`."""
    if temperature <= 0:
        raise ValueError(f"temperature {temperature} must be > 0 for log-probabilities")
    path = path or loss_path(h.device)
    return _TokenLogprobs.apply(h, w, targets, float(temperature), chunk_elems, path, vocab_start, combine)


def logprobs_at(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, temperature: float, rows: torch.Tensor | None,
    **split,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The lm_head's log-probs and entropies [B, T] for hidden states h [B, T, H] and targets
    [B, T], computed for the flat positions `rows` [K] only when given (0 elsewhere); split:
    vocab_start and combine of a vocabulary-parallel head."""
    flat, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if rows is None:
        logp, ent = token_logprobs(flat, w, t, temperature, **split)
        return logp.view(targets.shape), ent.view(targets.shape)
    logp, ent = token_logprobs(flat.index_select(0, rows), w, t.index_select(0, rows), temperature, **split)
    out = torch.zeros(t.shape[0], dtype=logp.dtype, device=logp.device)
    return out.index_add(0, rows, logp).view(targets.shape), out.index_add(0, rows, ent).view(targets.shape)


def head_logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h [B, T, H], w [V, H] -> fp32 logits [B, T, V], with the GEMM the log-prob path uses (its
    compute dtype, an fp32 result): sampling reads these, so the log-probs decoding saw and the
    trained ones differ only through the hidden states (not by a bf16 rounding of the logits)."""
    path = loss_path(h.device)
    dt = _compute_dtype(h, path)
    out = torch.empty(*h.shape[:-1], w.shape[0], dtype=torch.float32, device=h.device)
    with autocast_off(h.device.type):
        mm_fp32_out(h.reshape(-1, h.shape[-1]).to(dt), w.to(dt).T, out.view(-1, w.shape[0]))
    return out
