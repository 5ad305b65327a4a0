"""The divergence guard: an optimizer step whose loss or gradient norm is not finite (or, if asked,
whose loss spikes) is skipped - no parameter, optimizer-state, LR-schedule or expert-bias change -
on every rank alike, without making the GPU wait for the host.

How: the decision is a 0-d tensor computed on the device from global values (the all-reduced loss
and the global gradient norm), so it is the same on every rank. The fused AdamW skips its update
on the device when `found_inf` is 1 (and undoes its step count), the expert-bias update is scaled
by 0, and the decision is copied to the host without blocking. The host side - the LR schedule,
the skip counters, the stop after too many skips - settles one step later, when the copy has long
arrived (`settle()`), or at once at log and checkpoint steps. Optimizers without `found_inf`
(foreach, for-loop) decide on the host (one sync per step).

Loss spikes (training.loss_spike_sigma > 0): a step whose loss is above mean + sigma x std of the
last `loss_spike_window` applied steps is skipped too; the window lives on the device and in the
checkpoint, so a resumed run decides exactly as the one that never stopped.
"""

from __future__ import annotations

import torch

from ..config import Training


class StepGuard:
    def __init__(self, cfg: Training, device: torch.device):
        self.max_skipped, self.sigma, self.window = (
            cfg.max_skipped_steps,
            cfg.loss_spike_sigma,
            cfg.loss_spike_window,
        )
        self.device = device
        self.losses = torch.zeros(self.window, dtype=torch.float64, device=device)  # ring of applied losses
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # applied losses ever seen
        self.skipped_total = 0
        self.skipped_in_a_row = 0
        self._pending: tuple[torch.Tensor, torch.cuda.Event | None, int] | None = None
        self.last_step = 0  # the step the last settle() was about

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int) -> torch.Tensor:
        """1.0 if step `step` must be skipped, else 0.0 (a 0-d float32 tensor on the device)."""
        loss = loss.to(self.device, torch.float64)
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm.to(self.device)))
        if self.sigma > 0:
            full = self.count >= self.window
            mean, std = self.losses.mean(), self.losses.std()
            bad = bad | (full & (loss > mean + self.sigma * std))
        keep = ~bad
        slot = (
            torch.arange(self.window, device=self.device) == self.count % self.window
        )  # one-hot: no index read
        self.losses.copy_(torch.where(slot & keep, loss, self.losses))  # applied losses only
        self.count += keep.long()
        flag = bad.float()
        if flag.device.type == "cuda":
            host = torch.empty((), dtype=torch.float32, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event, step)
        else:
            self._pending = (flag, None, step)
        return flag

    def settle(self) -> bool | None:
        """Whether the last checked step was skipped (None: nothing to settle); updates the counters."""
        if self._pending is None:
            return None
        host, event, self.last_step = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()  # recorded a step ago: long done, unless called right after check()
        skipped = bool(host.numpy())  # a host copy (pinned on CUDA): reading it waits for nothing
        self.skipped_total += skipped
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        return skipped

    @property
    def must_stop(self) -> bool:
        return self.skipped_in_a_row >= self.max_skipped

    def state_dict(self) -> dict:
        """Plain numbers (saved as bytes by DCP), so a run may resume with another window size."""
        assert self._pending is None, "settle() before saving the guard"
        return {
            "losses": self.losses.tolist(),
            "count": int(self.count),
            "skipped_total": self.skipped_total,
            "skipped_in_a_row": self.skipped_in_a_row,
        }

    def load_state_dict(self, state: dict) -> None:
        losses = list(state["losses"])
        if len(losses) == self.window:
            self.losses.copy_(torch.tensor(losses, dtype=torch.float64))
            self.count.fill_(int(state["count"]))
        else:  # training.loss_spike_window changed: the spike rule starts over
            self.losses.zero_()
            self.count.zero_()
        self.skipped_total, self.skipped_in_a_row = (
            int(state["skipped_total"]),
            int(state["skipped_in_a_row"]),
        )
