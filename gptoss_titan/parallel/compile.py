"""torch.compile per block: the attention (fullgraph) and the norms.

Where it sits: after activation checkpointing, before FSDP (parallel/__init__.py). The MoE
router and the token dispatch have data-dependent shapes (and, with expert parallelism,
all-to-alls whose split sizes come from the data), so they stay outside fullgraph regions and run
eagerly. `Module.compile()` compiles in place, so parameter names stay clean.

Under per-op activation checkpointing the compiled module is the checkpoint wrapper itself, as in
TorchTitan: the checkpoint region is traced into the graph with its policy, so the attention
output it must keep (the CPU custom op, or flex_attention traced as a higher-order op on CUDA) is
saved rather than recomputed in backward.
"""

from __future__ import annotations

from torch import nn

from ..runtime.log import logger
from .activation_checkpoint import unwrap


def apply_compile(model: nn.Module) -> None:
    for block in model.blocks():
        b = unwrap(block)
        b.attention_norm.compile(fullgraph=True)
        b.attention.compile(fullgraph=True)  # the per-op checkpoint wrapper, when there is one
        b.ffn_norm.compile(fullgraph=True)
    logger.info(f"compiled attention and norms of {len(model.blocks())} blocks (MoE dispatch stays eager)")
