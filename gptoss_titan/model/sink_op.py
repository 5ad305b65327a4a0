"""One registration for the sink-attention custom ops: the forward op, its backward op, both fake
(meta) kernels and the autograd formula, in one call.

Shape legend as in attention.py: B batch, N query heads, G kv heads, T queries, D head dim.

Every such op shares one contract (attention.py's `flash_sink`, documents.py's `doc_flash_sink`,
parallel/ring_attention.py's `ring_sink`):

  forward(q, k, v, sinks, *extra) -> (out [B, N, T, D], lse [B, N, T], gate [B, N, T])
  backward(g, q, k, v, out, lse, gate, sinks, *extra) -> (dq, dk, dv, dsink)

with lse and gate in fp32 (fp64 for fp64 inputs). `extra` are the op's own arguments (masks,
segments, window, scale, ...): tensors among them are saved for backward, the others kept as
they are; none gets a gradient. Wrapped as custom ops, torch.compile and per-op activation
checkpointing see one opaque op with its own backward instead of tracing into the kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_SAVED = object()  # marks an `extra` tensor argument that went through save_for_backward


def _fake_forward(q, k, v, sinks, *extra):
    B, N, T, _ = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)  # the kernels' lse: fp32, or fp64 for fp64 inputs
    return q.new_empty(q.shape), q.new_empty((B, N, T), dtype=acc), q.new_empty((B, N, T), dtype=acc)


def _fake_backward(g, q, k, v, out, lse, gate, sinks, *extra):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), sinks.new_empty(sinks.shape)


def register_sink_op(name: str, forward: Callable, backward: Callable):
    """Register `forward` as the custom op gptoss_titan::<name> and `backward` as
    gptoss_titan::<name>_backward (schemas from their annotations), with fake kernels and the
    autograd formula; returns (forward op, backward op)."""
    fwd = torch.library.custom_op(f"gptoss_titan::{name}", forward, mutates_args=())
    bwd = torch.library.custom_op(f"gptoss_titan::{name}_backward", backward, mutates_args=())
    fwd.register_fake(_fake_forward)
    bwd.register_fake(_fake_backward)

    def setup_context(ctx, inputs, output) -> None:
        q, k, v, sinks, *extra = inputs
        tensors = [x for x in extra if isinstance(x, torch.Tensor)]
        ctx.save_for_backward(q, k, v, *output, sinks, *tensors)
        ctx.extra = [_SAVED if isinstance(x, torch.Tensor) else x for x in extra]

    def grad(ctx, g, _g_lse, _g_gate):
        q, k, v, out, lse, gate, sinks, *tensors = ctx.saved_tensors
        saved = iter(tensors)
        extra = [next(saved) if x is _SAVED else x for x in ctx.extra]
        dq, dk, dv, dsink = bwd(g, q, k, v, out, lse, gate, sinks, *extra)
        return dq, dk, dv, dsink, *([None] * len(extra))

    fwd.register_autograd(grad, setup_context=setup_context)
    return fwd, bwd
