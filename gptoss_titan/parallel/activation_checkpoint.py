"""Activation checkpointing: recompute a block's activations in backward instead of storing them.

Where it sits: after expert parallelism, before compile and FSDP (parallel/__init__.py).
Modes: "none"; "full" (every block); "selective" with option N (every N-th block, full) or "op".

"op" is per-op selective checkpointing of every block's attention (norm, projections, RoPE,
attention kernel): matmul, attention and collective outputs are kept, the cheap element-wise ops
are recomputed (no collective runs again in backward). The MoE half keeps its activations: its big tensors are matmul outputs that a per-op
policy would keep anyway, and recomputing it would re-run the expert all-to-alls and the experts'
own FSDP hooks inside the recomputation (which per-op replay cannot match).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from ..config import ActivationCheckpoint
from ..runtime.compat import CHECKPOINT_WRAPPED_MODULE, attention_save_ops, checkpoint_wrapper
from ..runtime.log import logger


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside an activation-checkpoint wrapper (or the module itself)."""
    return getattr(module, CHECKPOINT_WRAPPED_MODULE, module)


def save_list(compiled: bool) -> set:
    """Ops whose outputs per-op checkpointing keeps: matmuls and the attention kernel of every device
    path (CPU: the gptoss_titan::flash_sink custom op; CUDA: flex_attention, traced into the block's
    graph when compiled, else its separately compiled region; SDPA variants elsewhere)."""
    import gptoss_titan.model.documents  # noqa: F401  (registers the gptoss_titan:: attention ops)
    import gptoss_titan.parallel.ring_attention  # noqa: F401

    ops = {
        torch.ops.aten.mm.default,
        torch.ops.aten.addmm.default,
        torch.ops.aten.bmm.default,
        torch.ops.gptoss_titan.flash_sink.default,
        torch.ops.gptoss_titan.doc_flash_sink.default,
        torch.ops.gptoss_titan.ring_sink.default,
        *attention_save_ops(traced=compiled),
    }
    # The collectives inside a checkpointed region (tensor parallelism's sequence all-gather and
    # reduce-scatter, context parallelism's halo all-to-all): kept, so backward does not run them
    # again (TorchTitan keeps reduce-scatter and all-to-all; the gathered input is what the q/k/v
    # weight gradients need anyway).
    for namespace in ("_c10d_functional", "_c10d_functional_autograd"):
        for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single"):
            op = getattr(getattr(torch.ops, namespace, None), name, None)
            if op is not None:
                ops.add(op.default)
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_grouped_mm",
    ):
        if hasattr(torch.ops.aten, name):
            ops.add(getattr(torch.ops.aten, name).default)
    return ops


def _op_policy(save: set, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(
    model: nn.Module, cfg: ActivationCheckpoint, compiled: bool = False, preserve_rng_state: bool = False
) -> None:
    """compiled: the compile pass follows (the checkpoint regions are then traced by Dynamo).
    preserve_rng_state: the recompute replays the forward's random draws (LoRA dropout); the model
    has no other randomness, so it is off (and free) otherwise."""
    if cfg.mode == "none":
        return
    every = int(cfg.selective_ac_option) if cfg.mode == "selective" and cfg.selective_ac_option != "op" else 1
    per_op = cfg.mode == "selective" and cfg.selective_ac_option == "op"
    save = save_list(compiled)
    wrapped = 0
    for name, block in model.layers.named_children():  # a pipeline stage holds some of them
        if block.layer_id % every:
            continue
        if per_op:
            ctx = partial(create_selective_checkpoint_contexts, partial(_op_policy, save))
            block.attention = checkpoint_wrapper(
                block.attention, context_fn=ctx, preserve_rng_state=preserve_rng_state
            )
        else:
            setattr(model.layers, name, checkpoint_wrapper(block, preserve_rng_state=preserve_rng_state))
        wrapped += 1
    kind = "per-op selective" if per_op else ("full" if every == 1 else f"every {every} blocks")
    logger.info(f"activation checkpointing ({kind}) on {wrapped}/{len(model.blocks())} blocks")
