"""Fused lm_head + cross-entropy that never materializes the full [M, V] logits.

Shape legend: M rows (tokens), H hidden, V vocabulary, C rows per chunk.

With V = 201088, full fp32 logits for a 4 x 2048 batch alone take 6.6 GB (and as much again for
their gradient). Here the rows are processed in chunks of about `chunk_elems` logits: each chunk's
logits are computed, reduced to its loss, and - when gradients are needed - turned into its
gradients right away (softmax - onehot), which are kept for backward. Peak extra memory is one
chunk of logits plus one gradient the size of the inputs. Matmul work equals the unfused version
(one forward, two gradient matmuls); backward only scales the stored gradients.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Autocast's dtype on accelerators; fp32 on CPU, where bf16 GEMMs of these shapes (K = hidden,
    or M = vocab) run 10-80x slower than fp32 in current builds (measured: torch 2.13 CPU)."""
    dev = t.device.type
    if dev != "cpu" and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.float32 if dev == "cpu" else t.dtype


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk_elems: int):
        """h [M, H], w [V, H], targets [M] (IGNORE_INDEX = skip) -> summed loss (fp32 scalar)."""
        dt = _compute_dtype(h)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dt), w.to(dt)
            M, V = h.shape[0], w.shape[0]
            rows = max(1, chunk_elems // V)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            grad_w = (
                torch.zeros(w.shape, dtype=torch.float32, device=w.device)
                if ctx.needs_input_grad[1]
                else None
            )
            # One reused [C, V] fp32 workspace: fresh allocations this large cost more than the math.
            buf = torch.empty(min(rows, M), V, dtype=torch.float32, device=h.device)
            for s in range(0, M, rows):
                t = targets[s : s + rows]  # [C]
                c = t.shape[0]
                valid = t != IGNORE_INDEX  # [C]
                safe_t = t.clamp(min=0).unsqueeze(1)  # [C, 1]
                logits = buf[:c]  # [C, V]
                if dt == torch.float32:
                    torch.mm(hc[s : s + c], wc.T, out=logits)
                else:
                    logits.copy_(hc[s : s + c] @ wc.T)
                picked = logits.gather(1, safe_t).squeeze(1)  # [C]
                mx = logits.amax(dim=1, keepdim=True)  # [C, 1]
                sumexp = logits.sub_(mx).exp_().sum(dim=1, keepdim=True)  # [C, 1]; logits now exp(l - max)
                lse = mx.squeeze(1) + sumexp.squeeze(1).log()  # [C]
                total += ((lse - picked) * valid).sum()
                if need_grad:
                    g = logits.div_(sumexp)  # softmax [C, V]
                    g.scatter_add_(1, safe_t, torch.full_like(safe_t, -1, dtype=g.dtype))
                    if not bool(valid.all()):
                        g.mul_(valid.unsqueeze(1))
                    g = g.to(dt)
                    if grad_h is not None:
                        grad_h[s : s + c] = (g @ wc).to(h.dtype)  # [C, H]
                    if grad_w is not None:
                        grad_w.addmm_(g.T.float(), hc[s : s + c].float())  # [V, H]
        ctx.save_for_backward(grad_h, grad_w.to(w.dtype) if grad_w is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None
        return gh, gw, None, None


def fused_linear_cross_entropy(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk_elems: int = 1 << 25
) -> torch.Tensor:
    """Sum over rows of cross_entropy(h @ w.T, targets), skipping IGNORE_INDEX; h [M, H], w [V, H]."""
    return _FusedLinearCrossEntropy.apply(h, w, targets, chunk_elems)
