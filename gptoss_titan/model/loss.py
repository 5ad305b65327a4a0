"""Fused lm_head + cross-entropy that never materializes the full [M, V] logits.

Shape legend: M rows (tokens), H hidden, V vocabulary, C rows per chunk.

With V = 201088, full fp32 logits for a 4 x 2048 batch alone take 6.6 GB (and as much again for
their gradient). Here the rows are processed in chunks of about `chunk_elems` logits: each chunk's
logits are computed, reduced to its loss, and - when gradients are needed - turned into its
gradients right away (softmax - onehot), which are kept for backward. Peak extra memory is one
chunk of logits plus one gradient the size of the inputs. Matmul work equals the unfused version
(one forward, two gradient matmuls); backward only scales the stored gradients.

Two paths (`loss_path`): on CPU every GEMM is fp32; on GPUs the GEMMs run in the compute dtype
(bf16) with fp32 outputs and accumulation, in chunks of thousands of rows.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..runtime.compat import addmm_fp32_, mm_fp32_out
from ..runtime.dtypes import autocast_off, compute_dtype

IGNORE_INDEX = -100
CPU_CHUNK_ELEMS = 1 << 25  # 128 MiB of fp32 logits: ~166 rows at V = 201088
ACCEL_CHUNK_ELEMS = (
    1 << 28
)  # 1 GiB (+ its bf16 gradient): ~1335 rows at V = 201088, the [V, H] weight read few times


def loss_path(device: torch.device) -> str:
    """ "cpu": fp32 GEMMs (bf16 GEMMs of these shapes run 10-80x slower than fp32 on CPUs, measured
    with torch 2.13), small chunks. "accel" (GPUs): GEMMs in the compute dtype with fp32
    accumulation, large chunks."""
    return "cpu" if device.type == "cpu" else "accel"


def _compute_dtype(t: torch.Tensor, path: str) -> torch.dtype:
    """fp32 on the CPU path; elsewhere autocast's dtype, or the inputs' (bf16 under FSDP)."""
    if path == "cpu":
        return torch.float32
    return compute_dtype(t)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        h: torch.Tensor,
        w: torch.Tensor,
        targets: torch.Tensor,
        chunk_elems: int | None,
        path: str | None,
        vocab_start: int,
        combine: RowCombine | None,
        grad_enabled: bool,
    ):
        """h [M, H], w [V, H], targets [M] (IGNORE_INDEX = skip) -> summed loss (fp32 scalar).
        No host synchronization: ignored rows get a zero gradient by arithmetic, not by a branch.
        With `combine`, w holds rows vocab_start .. vocab_start + V - 1 of a larger vocabulary
        (see fused_linear_cross_entropy). grad_enabled: whether the caller runs with gradients on
        (ctx.needs_input_grad stays True under torch.no_grad: validation would do the gradient
        GEMMs and allocate their buffers for nothing)."""
        path = path or loss_path(h.device)
        dt = _compute_dtype(h, path)
        grad_h_needed, grad_w_needed = (grad_enabled and n for n in ctx.needs_input_grad[:2])
        need_grad = grad_h_needed or grad_w_needed
        with autocast_off(h.device.type):
            hc, wc = h.to(dt), w.to(dt)
            M, V = h.shape[0], w.shape[0]
            rows = max(1, (chunk_elems or (CPU_CHUNK_ELEMS if path == "cpu" else ACCEL_CHUNK_ELEMS)) // V)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if grad_h_needed else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if grad_w_needed else None
            # One reused [C, V] fp32 workspace: fresh allocations this large cost more than the math.
            buf = torch.empty(min(rows, M), V, dtype=torch.float32, device=h.device)
            for s in range(0, M, rows):
                t = targets[s : s + rows]  # [C]
                c = t.shape[0]
                valid = t != IGNORE_INDEX  # [C]
                here = valid if combine is None else valid & (t >= vocab_start) & (t < vocab_start + V)
                safe_t = (t - vocab_start).clamp(min=0, max=V - 1).unsqueeze(1)  # [C, 1]
                logits = buf[:c]  # [C, V]
                mm_fp32_out(hc[s : s + c], wc.T, logits)  # fp32 logits (fp32 accumulation for bf16)
                picked = logits.gather(1, safe_t).squeeze(1) * here  # [C]
                mx = logits.amax(dim=1, keepdim=True)  # [C, 1]
                if combine is not None:
                    mx = combine.max(mx)
                sumexp = logits.sub_(mx).exp_().sum(dim=1, keepdim=True)  # [C, 1]; logits now exp(l - max)
                if combine is not None:
                    sumexp, picked = combine.sum(sumexp, picked)
                lse = mx.squeeze(1) + sumexp.squeeze(1).log()  # [C]
                total += ((lse - picked) * valid).sum()
                if need_grad:
                    # softmax - onehot; an ignored row divides by inf and subtracts 0: a zero row
                    g = logits.div_(sumexp.masked_fill(~valid.unsqueeze(1), float("inf")))  # [C, V]
                    g.scatter_add_(1, safe_t, -here.unsqueeze(1).to(g.dtype))
                    g = g.to(dt)
                    if grad_h is not None:
                        grad_h[s : s + c] = (g @ wc).to(h.dtype)  # [C, H]
                    if grad_w is not None:
                        addmm_fp32_(grad_w, g.T, hc[s : s + c])  # [V, H] += g^T h, accumulated in fp32
        ctx.save_for_backward(grad_h, grad_w.to(w.dtype) if grad_w is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None


class RowCombine(Protocol):
    """Combines per-row statistics over the parts of a vocabulary held in different places."""

    def max(self, mx: torch.Tensor) -> torch.Tensor:
        """[C, 1] row maxima of one part -> the maxima over all parts."""

    def sum(self, sumexp: torch.Tensor, picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[C, 1] sums of exp(logit - max) and [C] target logits (0 where the part lacks the
        target) of one part -> their sums over all parts."""

    def sum_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[k, C] per-row partial sums of one part -> their sums over all parts (in place)."""


def fused_linear_cross_entropy(
    h: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    chunk_elems: int | None = None,
    path: str | None = None,
    vocab_start: int = 0,
    combine: RowCombine | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over rows of cross_entropy(h @ w.T, targets), skipping IGNORE_INDEX; h [M, H], w [V, H].

    chunk_elems: logits per chunk (default by path); path: "cpu" or "accel" (default: `loss_path`
    of the device; tests force the accelerator path on the CPU).
    A vocabulary split in parts (vocabulary-parallel lm_head): w holds rows vocab_start ..
    vocab_start + V - 1, and `combine` merges the row maxima, sums of exponentials and target
    logits of all parts; every part then returns the loss of the whole vocabulary, and the
    gradients of its own rows of w and its share of h's (summed over parts by the caller).
    rows [K]: only these rows of h and targets are computed (every other target must be
    IGNORE_INDEX: their gradient is zero anyway, and the GEMMs skip them)."""
    if rows is not None:
        h, targets = h.index_select(0, rows), targets.index_select(0, rows)
    grad = torch.is_grad_enabled()
    return _FusedLinearCrossEntropy.apply(h, w, targets, chunk_elems, path, vocab_start, combine, grad)
