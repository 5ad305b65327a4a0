"""Host batches -> what the model's forward takes on this rank.

Tokens and targets go to the device (on CUDA pinned and asynchronously: a copy from pageable
memory would make the host wait for the GPU's queue). With training.document_mask, the documents
of each packed sequence are found on the whole sequence first (model/documents.py); with context
parallelism, each rank then keeps its share of every sequence (parallel/context_parallel.py) and
the layout it passes to the model carries the global positions and the ring.

The positions whose targets count (not IGNORE_INDEX) are found on the host too: the lm_head and
the loss then run on those rows alone (a chat batch's prompts, a packed batch's padding), with
no device-to-host copy on CUDA.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..model.documents import Documents, find_documents
from ..model.local import to_device
from ..model.loss import IGNORE_INDEX
from ..parallel.context_parallel import CPBatch, CPLayout, split_batch


class Batch(NamedTuple):
    """One micro-batch as this rank's model takes it: `model(tokens, targets, documents=layout,
    target_rows=rows)`."""

    tokens: torch.Tensor  # [B, L] on the device
    targets: torch.Tensor  # [B, L] on the device, IGNORE_INDEX = no loss
    layout: Documents | CPBatch | None
    rows: torch.Tensor | None  # [K] flat indices of the counted targets; None: all of them
    n_targets: int  # K, known on the host


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

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Batch:
        """x, y int64 [B, T] on the host -> this rank's Batch; with cp, tokens and targets are its
        [B, T / cp]."""
        host = torch.device("cpu")  # context parallelism splits the documents on the host first
        docs = find_documents(x, host if self.cp_layout else self.device) if self.document_mask else None
        layout = docs
        if self.cp_layout is not None:
            x, y, layout = split_batch(x, y, docs, self.cp_layout, self.cp_rank, self.cp_group, self.device)
        counted = np.flatnonzero((y.reshape(-1) != IGNORE_INDEX).numpy())  # on the host
        n = int(counted.size)
        rows = None if n == y.numel() else to_device(torch.from_numpy(counted), self.device)
        return Batch(to_device(x, self.device), to_device(y, self.device), layout, rows, n)
