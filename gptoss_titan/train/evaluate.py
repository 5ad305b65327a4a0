"""What the trainer measures besides training: the validation loss, and the periodic greedy sample."""

from __future__ import annotations

import numpy as np
import torch

from ..config import JobConfig
from ..data import TokenLoader, get_tokenizer
from ..data.packed import ChatSplit
from ..infer.generate import generate
from ..model.tokens import STOP_IDS
from .step import TrainStep


@torch.no_grad()
def validation_loss(step: TrainStep, tokens: np.ndarray | ChatSplit, cfg: JobConfig) -> float:
    """Mean cross-entropy over validation.steps batches of the validation tokens (every data-parallel
    rank its own share, summed over all of them; with cp each rank its part of each sequence);
    the model is left in training mode. With a pipeline (parallel/pipeline.py) the same batches
    go through its stages."""
    t = cfg.training
    model, pipeline, inputs = step.model, step.pipeline, step.inputs
    dp_rank, dp_degree = step.dp_rank, step.dp_degree
    if isinstance(tokens, ChatSplit):  # conversations: packed and masked as in training
        loader = tokens.loader(
            t.seq_len, t.local_batch_size, dp_rank, dp_degree, shuffle=False, pack=t.document_mask
        )
    else:
        loader = TokenLoader(tokens, t.seq_len, t.local_batch_size, dp_rank, dp_degree, shuffle=False)
    steps = min(cfg.validation.steps, max(loader.num_samples // (loader.b * loader.dp_degree), 1))
    model.eval()
    total, count = 0.0, 0
    batches = []
    for _ in range(steps):
        x, y = loader.next_batch()
        with step.autocast():
            tokens, targets, layout, rows, n = inputs(x, y)
            if pipeline is None:
                ce_sum, _, _ = model(tokens, targets, documents=layout, target_rows=rows)
                total += float(ce_sum)
            else:
                batches.append((tokens, targets, rows, layout))
        count += n
    if pipeline is not None:
        total = float(pipeline.evaluate(batches))
    model.train()
    sums = step.all_reduce(torch.tensor([total, count], dtype=torch.float64, device=inputs.device))
    return float(sums[0] / sums[1])


@torch.no_grad()
def greedy_sample(step: TrainStep, prompt: str, n_tokens: int, tokenizer: str) -> str:
    """The greedy continuation of `prompt` (KV-cached, through the model's own forward)."""
    enc = get_tokenizer(tokenizer)
    model = step.model
    ids = torch.tensor([enc.encode_ordinary(prompt)], device=step.device)
    model.eval()
    with step.autocast():
        out = generate(model, ids, n_tokens, temperature=0.0, stop_ids=STOP_IDS)
    model.train()
    return enc.decode(out[0, ids.shape[1] :].tolist())
