"""Op budgets of a training step and of a validation batch, counted at the dispatcher on the GPU
code paths forced on the CPU (the accelerator loss branch, bf16 compute, grouped experts).

The lm_head is the largest GEMM of a small model and of the 20b (201,088 rows): a training step
runs three per loss chunk (the logits, then the gradients to h and to w, recomputed from the
saved statistics); validation runs one per chunk and nothing of backward. The bench flavor's
vocabulary (8,192) is no other dimension of the model, so a GEMM with such an operand is the
lm_head's.
"""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gptoss_titan.config import parse_args
from gptoss_titan.train.evaluate import validation_loss
from gptoss_titan.train.trainer import Trainer

from ..helpers.training import argv_for

GEMMS = {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "linear", "matmul"}


class OpCount(TorchDispatchMode):
    """Ops by name, and the GEMMs with an operand of `vocab` rows or columns."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.ops, self.head_gemms = vocab, Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name in GEMMS and any(isinstance(a, torch.Tensor) and self.vocab in a.shape for a in args[:3]):
            self.head_gemms += 1
        return func(*args, **(kwargs or {}))


def test_lm_head_gemms_per_training_step_and_validation_batch(tmp_path, monkeypatch):
    import gptoss_titan.model.loss as loss_module

    monkeypatch.setattr(loss_module, "loss_path", lambda device: "accel")
    cfg = parse_args(
        argv_for(
            tmp_path,
            "--model.expert_kernel=grouped",
            "--training.mixed_precision_param=bfloat16",
            "--training.global_batch_size=4",  # 2 micro-batches of 2 x 32 tokens: one loss chunk each
            "--validation.steps=3",
        )
    )
    tr = Trainer(cfg)
    vocab = tr.model_args.vocab_size
    assert vocab == 8192 and tr.accum_steps == 2
    tr.train_step()  # AdamW's state is made in the first step
    batches = [tr.train_loader.next_batch() for _ in range(tr.accum_steps)]
    with OpCount(vocab) as train:
        tr.train_module(batches, tr.step)
    assert train.head_gemms == 3 * tr.accum_steps, train.head_gemms
    with OpCount(vocab) as val:
        validation_loss(tr.train_module, tr.val_tokens, cfg)
    assert val.head_gemms == cfg.validation.steps, val.head_gemms  # one chunk per batch
    backward = sorted(n for n in val.ops if "backward" in n)
    assert backward == [], backward
    # the rest of the model's GEMMs: a forward's share of the training step's (which adds two per
    # GEMM in backward), the same number of batches
    per_batch_train = (sum(train.ops[g] for g in GEMMS) - train.head_gemms) / tr.accum_steps
    per_batch_val = (sum(val.ops[g] for g in GEMMS) - val.head_gemms) / cfg.validation.steps
    assert per_batch_val * 2 < per_batch_train, (per_batch_val, per_batch_train)
