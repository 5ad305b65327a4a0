"""torch.compile per block: the attention (fullgraph) and the norms.

Where it sits: after activation checkpointing, before FSDP (parallel/__init__.py). The MoE
router and the token dispatch have data-dependent shapes (and, with expert parallelism,
all-to-alls whose split sizes come from the data), so they stay outside fullgraph regions and run
eagerly. `Module.compile()` compiles in place, so parameter names stay clean.
"""

from __future__ import annotations

from torch import nn

from ..metrics import logger
from .activation_checkpoint import unwrap


def apply_compile(model: nn.Module) -> None:
    for block in model.layers:
        b = unwrap(block)
        b.attention_norm.compile(fullgraph=True)
        unwrap(b.attention).compile(fullgraph=True)
        b.ffn_norm.compile(fullgraph=True)
    logger.info(f"compiled attention and norms of {len(model.layers)} blocks (MoE dispatch stays eager)")
