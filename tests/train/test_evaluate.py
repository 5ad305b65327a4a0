"""validation_loss (train/evaluate.py) through a TrainStep: the mean cross-entropy of the first
validation.steps batches in order, computed here from full logits; the model back in training mode."""

import numpy as np
import torch
import torch.nn.functional as F

from gptoss_titan.data import TokenLoader
from gptoss_titan.train.evaluate import validation_loss

from ..helpers.training import SMALL, train_step_for


def test_validation_loss_is_the_mean_cross_entropy(tmp_path):
    cfg, step = train_step_for(tmp_path, *SMALL, "--validation.steps=2")
    t = cfg.training
    tokens = np.random.default_rng(0).integers(0, step.plan.args.vocab_size, 4 * t.seq_len * 3 + 1)
    got = validation_loss(step, tokens, cfg)
    assert step.model.training
    loader = TokenLoader(tokens, t.seq_len, t.local_batch_size, shuffle=False)
    total, count = 0.0, 0
    with torch.no_grad():
        step.model.eval()
        for _ in range(2):
            x, y = loader.next_batch()
            logits = step.model(x).double()
            total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
    # fp32 logits (chunked and fused in the model, whole here): sums of 2 x 2 x 32 terms of size ~9
    # agree to a few fp32 roundoffs (6e-8) of the total; 1e-5 relative leaves a wide margin
    assert abs(got - total / count) <= 1e-5 * total / count
