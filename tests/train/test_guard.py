"""The divergence guard (guard.py): which steps it skips, and its state across a checkpoint."""

import math

import torch

from gptoss_titan.config import Training
from gptoss_titan.train.guard import StepGuard


def run(guard: StepGuard, losses: list[float], norm: float = 1.0, start: int = 1) -> list[bool]:
    out = []
    for i, loss in enumerate(losses, start):
        guard.check(torch.tensor(loss), torch.tensor(norm), i)
        out.append(guard.settle())
    return out


def test_non_finite_steps_are_skipped_and_counted():
    g = StepGuard(Training(max_skipped_steps=2), torch.device("cpu"))
    assert run(g, [2.0, math.nan, 1.9]) == [False, True, False]
    assert (g.skipped_total, g.skipped_in_a_row, g.last_step) == (1, 0, 3)
    g.check(torch.tensor(1.8), torch.tensor(math.inf), 4)
    assert g.settle() and not g.must_stop
    g.check(torch.tensor(math.nan), torch.tensor(1.0), 5)
    assert g.settle() and g.must_stop and g.skipped_in_a_row == 2


def test_loss_spike_rule_once_the_window_is_full():
    """sigma 3 over the last 8 applied losses: a jump of 10 std is skipped, ordinary noise is not;
    skipped losses do not enter the window; before the window is full nothing is judged."""
    g = StepGuard(Training(loss_spike_sigma=3.0, loss_spike_window=8), torch.device("cpu"))
    noise = [2.0 + 0.01 * math.sin(i) for i in range(8)]
    assert run(g, [50.0] + noise) == [False] * 9  # the first loss is huge but the window was not full
    assert run(g, noise[:4], start=10) == [False] * 4
    assert run(g, [2.5, 2.005], start=14) == [True, False]
    assert g.skipped_total == 1 and 2.5 not in g.losses.tolist()


def test_off_by_default_and_state_round_trip():
    g = StepGuard(Training(), torch.device("cpu"))
    assert g.sigma == 0 and run(g, [2.0] * 5 + [500.0]) == [False] * 6  # no spike rule unless asked
    run(g, [math.nan])
    h = StepGuard(Training(), torch.device("cpu"))
    h.load_state_dict(g.state_dict())
    assert (h.skipped_total, h.skipped_in_a_row, int(h.count)) == (1, 1, 6)
    assert torch.equal(h.losses, g.losses)
    other = StepGuard(Training(loss_spike_window=10), torch.device("cpu"))  # another window: starts over
    other.load_state_dict(g.state_dict())
    assert int(other.count) == 0 and other.skipped_total == 1
