"""Host batches -> what the model's forward takes on this rank.

Tokens and targets go to the device (on CUDA pinned and asynchronously: a copy from pageable
memory would make the host wait for the GPU's queue). With training.document_mask, the documents
of each packed sequence are found on the whole sequence first (model/documents.py); with context
parallelism, each rank then keeps its share of every sequence (parallel/context_parallel.py) and
the layout it passes to the model carries the global positions and the ring.
"""

from __future__ import annotations

import torch

from ..model.documents import Documents, find_documents
from ..model.local import to_device
from ..parallel.context_parallel import CPBatch, CPLayout, split_batch


class ModelInputs:
    def __init__(
        self,
        document_mask: bool,
        device: torch.device,
        cp_layout: CPLayout | None = None,
        cp_rank: int = 0,
        cp_group: str | None = None,
    ):
        self.document_mask, self.device = document_mask, device
        self.cp_layout, self.cp_rank, self.cp_group = cp_layout, cp_rank, cp_group

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Documents | CPBatch | None]:
        """x, y int64 [B, T] on the host -> (tokens, targets, layout) for `model(tokens, targets,
        documents=layout)`; with cp, tokens and targets are this rank's [B, T / cp]."""
        host = torch.device("cpu")  # context parallelism splits the documents on the host first
        docs = find_documents(x, host if self.cp_layout else self.device) if self.document_mask else None
        layout = docs
        if self.cp_layout is not None:
            x, y, layout = split_batch(x, y, docs, self.cp_layout, self.cp_rank, self.cp_group, self.device)
        return to_device(x, self.device), to_device(y, self.device), layout
