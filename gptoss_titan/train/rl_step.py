"""RLStep: the policy update of one rollout batch, on top of TrainStep (step.py).

The batch (every completion of this rank, rl/rollout.py) goes through the model in micro-batches
of training.local_batch_size sequences; the targets are the sampled tokens only (the prompt and
the padding are ignored). Each micro-batch's loss (rl/loss.py) is already divided by the global
token (GRPO) or completion (GSPO) count, so the gradients add up to the batch's.

Old log-probs: with one update per batch (rl.updates_per_batch = 1) they are the update's own
forward, detached: the ratio is exactly 1. With more, a no-gradient pass of the same micro-batches
through the same forward records them first; `old_logprob_diff_max` (the largest |old - new| of
the first update) is then 0 exactly: training and recording run the same code on the same
batches. The reference for the KL term: with LoRA the same model with its adapters off; with full
fine-tuning a frozen copy sharded like the policy (rl_trainer.py).
Every update but the last of a batch skips itself when its loss or gradient norm is not finite; the
last goes through the step guard (guard.py) like any training step (a skip there leaves the
earlier updates of the batch applied). All updates of a step use the step's learning rate.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..model.local import to_device
from ..model.loss import IGNORE_INDEX
from ..parallel import sync_replicated_grads
from ..rl.loss import Objective, policy_loss
from ..rl.rollout import Rollout
from .metrics import StepResult
from .step import TrainStep


@dataclass
class RLResult(StepResult):
    extra: dict = field(default_factory=dict)  # RL metrics, as host numbers or device tensors

    def stats(self) -> dict:
        out = super().stats()
        out.update({k: float(v) for k, v in self.extra.items()})
        return out


@contextlib.contextmanager
def adapters_off(model):
    """The LoRA base: every adapter's scale 0 for the block (the base weights' output exactly)."""
    mods = [m for m in model.modules() if getattr(m, "lora_scale", 0)]
    scales = [m.lora_scale for m in mods]
    for m in mods:
        m.lora_scale = 0.0
    try:
        yield
    finally:
        for m, s in zip(mods, scales):
            m.lora_scale = s


class RLStep(TrainStep):
    reference = None  # full fine-tuning's frozen KL reference (rl_trainer.py); LoRA: adapters off

    def rl_update(self, ro: Rollout, advantages: torch.Tensor, step: int) -> RLResult:
        cfg, rl = self.cfg, self.cfg.rl
        self.settle()  # the previous step's skip decision: the LR schedule, before any update here
        obj = Objective(rl.loss, rl.clip_low, rl.clip_high, rl.kl_coef)
        dev, temp = self.device, rl.temperature
        x_all = ro.tokens[:, :-1]
        mask_all = ro.target_mask()
        y_all = torch.where(mask_all, ro.tokens[:, 1:], IGNORE_INDEX)
        mb = cfg.training.local_batch_size
        slices = [slice(s, s + mb) for s in range(0, x_all.shape[0], mb)]
        # the lm_head runs on the sampled positions only (the prompt's are most of a sequence)
        batches = []
        for s in slices:
            rows = mask_all[s].reshape(-1).nonzero().squeeze(1)
            parts = (x_all[s], y_all[s], mask_all[s], advantages[s], ro.decode_logprobs[s], rows)
            batches.append(tuple(to_device(t, dev) for t in parts))  # asynchronous on CUDA
        counts = torch.tensor([mask_all.sum(), mask_all.any(1).sum()], dtype=torch.float64, device=dev)
        token_count, seq_count = self.all_reduce(counts)
        use_ref = rl.kl_coef > 0 or rl.log_kl
        old, ref = [None] * len(batches), [None] * len(batches)
        if rl.updates_per_batch > 1 or use_ref:
            with torch.no_grad(), self.autocast():
                for i, (x, y, _, _, _, rows) in enumerate(batches):
                    if rl.updates_per_batch > 1:
                        old[i] = self.model(x, y, logprob_temperature=temp, target_rows=rows)[0]
                    if use_ref and self.reference is not None:
                        ref[i] = self.reference(x, y, logprob_temperature=temp, target_rows=rows)[0]
                    elif use_ref:
                        with adapters_off(self.model):
                            ref[i] = self.model(x, y, logprob_temperature=temp, target_rows=rows)[0]
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        m = {k: zero.clone() for k in ("loss", "clipped", "kl", "entropy", "old_diff", "decode_diff")}
        for update in range(rl.updates_per_batch):
            first, last = update == 0, update == rl.updates_per_batch - 1
            counts_total, loss_total = None, zero.clone()
            for i, (x, y, mask, adv, decode, rows) in enumerate(batches):
                with self.autocast():
                    logp, ent, c = self.model(x, y, logprob_temperature=temp, target_rows=rows)
                o = old[i] if old[i] is not None else logp.detach()
                parts = policy_loss(logp, o, adv, mask, obj, token_count, seq_count, ref[i])
                parts.loss.backward()
                loss_total += parts.loss.detach()
                m["clipped"] += parts.clipped
                counts_total = c if counts_total is None else counts_total + c
                if first:
                    m["kl"] += parts.kl_sum
                    m["entropy"] += (ent * mask).sum()
                    m["old_diff"] = torch.maximum(m["old_diff"], ((logp.detach() - o).abs() * mask).amax())
                    d = ((logp.detach().float() - decode).abs() * mask).amax()
                    m["decode_diff"] = torch.maximum(m["decode_diff"], d.double())
            if first:
                m["loss"] = self.all_reduce(loss_total.clone())
            result = self._apply(loss_total, counts_total, token_count, step, last)
        sums = self.all_reduce(torch.stack([m["clipped"], m["kl"], m["entropy"]]))
        maxes = torch.stack([m["old_diff"], m["decode_diff"]])
        if self.meshes is not None:
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=self.meshes.loss.get_group())
        n_clip = token_count if rl.loss == "grpo" else seq_count
        result.loss = m["loss"]
        result.extra.update(
            clip_frac=sums[0] / (n_clip * rl.updates_per_batch),
            kl=sums[1] / token_count,
            entropy=sums[2] / token_count,
            old_logprob_diff_max=maxes[0],
            logprob_diff_max=maxes[1],
        )
        return result

    def _apply(self, loss_total, counts_total, token_count, step: int, last: bool) -> RLResult:
        """Sync, clip and apply one update; the last of a batch through the step guard."""
        for part in self.parts():
            sync_replicated_grads(part)
        grad_norm = self.clip_gradients(step)
        loss = self.all_reduce(loss_total.clone())
        lr = self.optimizer.param_groups[0]["lr"]
        if last:
            skip = self.guard.check(loss, grad_norm, step)
        else:
            skip = (~torch.isfinite(loss) | ~torch.isfinite(grad_norm)).float()
        if self.cfg.optimizer.implementation == "fused":
            self.optimizer.found_inf = skip
            self.optimizer.step()
        elif not bool(skip):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.all_reduce(counts_total)
        return RLResult(loss, lr, grad_norm, counts_total, None, 0.0, skip, token_count)
