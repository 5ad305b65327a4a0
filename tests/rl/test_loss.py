"""GRPO and GSPO (rl/loss.py) against a direct, loop-by-loop definition in fp64 on tiny inputs:
advantages, both clips (each branch taken), masks, the KL term, split micro-batches."""

import math

import pytest
import torch

from gptoss_titan.rl.loss import Objective, group_advantages, policy_loss


def direct_advantages(rewards, G, scale):
    out = []
    for i in range(0, len(rewards), G):
        g = rewards[i : i + G]
        mean = sum(g) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in g) / (G - 1))
        out += [(r - mean) / (std + 1e-4) if scale == "group" else r - mean for r in g]
    return out


def direct_loss(logp, old, adv, mask, obj, ref):
    """The objective written out: per token (GRPO) or per sequence (GSPO), plus k3 KL."""
    B, T = len(logp), len(logp[0])
    lo, hi = 1 - obj.clip_low, 1 + obj.clip_high
    n_tok = sum(mask[b][t] for b in range(B) for t in range(T))
    n_seq = sum(any(mask[b]) for b in range(B))
    total, kl_total = 0.0, 0.0
    for b in range(B):
        toks = [t for t in range(T) if mask[b][t]]
        if obj.loss_type == "grpo":
            for t in toks:
                r = torch.exp(logp[b][t] - old[b][t])
                total = total - torch.minimum(r * adv[b], torch.clamp(r, lo, hi) * adv[b]) / n_tok
        elif toks:
            s = torch.exp(sum(logp[b][t] - old[b][t] for t in toks) / len(toks))
            total = total - torch.minimum(s * adv[b], torch.clamp(s, lo, hi) * adv[b]) / n_seq
        for t in toks:
            d = ref[b][t] - logp[b][t]
            kl_total = kl_total + (torch.exp(d) - d - 1)
    return total + obj.kl_coef * kl_total / n_tok, kl_total


@pytest.mark.parametrize("scale", ["group", "none"])
def test_group_advantages(scale):
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.2, 0.9], dtype=torch.float64)
    got = group_advantages(r, 4, scale)
    torch.testing.assert_close(
        got, torch.tensor(direct_advantages(r.tolist(), 4, scale), dtype=torch.float64)
    )
    assert group_advantages(torch.ones(4, dtype=torch.float64), 4).abs().max() == 0  # all alike: no signal


@pytest.mark.parametrize("loss_type", ["grpo", "gspo"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_policy_loss_and_gradient_equal_the_direct_definition(loss_type, kl_coef):
    g = torch.Generator().manual_seed(1)
    B, T = 6, 7
    clip = (0.2, 0.28) if loss_type == "grpo" else (0.03, 0.04)
    obj = Objective(loss_type, *clip, kl_coef)
    old = -torch.rand(B, T, dtype=torch.float64, generator=g) * 3
    # ratios spread well past both clips, so every branch of min/clip is exercised
    logp = (old + torch.randn(B, T, dtype=torch.float64, generator=g) * 0.4).requires_grad_()
    ref = old + torch.randn(B, T, dtype=torch.float64, generator=g) * 0.3
    adv = torch.tensor([1.5, -0.7, 0.0, -1.2, 0.9, -0.4], dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2] = False  # a completion with no sampled token (cut at the prompt)
    mask[0, 0] = True
    n_tok, n_seq = mask.sum().double(), mask.any(1).sum().double()

    parts = policy_loss(logp, old, adv, mask, obj, n_tok, n_seq, ref)
    (grad,) = torch.autograd.grad(parts.loss, logp)
    lp = logp.detach().clone().requires_grad_()
    want, want_kl = direct_loss(lp, old, adv, mask.tolist(), obj, ref)
    (want_grad,) = torch.autograd.grad(want, lp)
    torch.testing.assert_close(parts.loss, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(parts.kl_sum, want_kl.detach(), rtol=1e-12, atol=1e-14)
    assert 0 < int(parts.clipped) < (mask.sum() if loss_type == "grpo" else B)
    # the same batch in two micro-batches adds up to the same loss and gradient
    halves = [
        policy_loss(logp[s], old[s], adv[s], mask[s], obj, n_tok, n_seq, ref[s])
        for s in (slice(0, 3), slice(3, 6))
    ]
    (split_grad,) = torch.autograd.grad(sum(h.loss for h in halves), logp)
    torch.testing.assert_close(split_grad, grad, rtol=1e-12, atol=1e-14)
    assert sum(int(h.clipped) for h in halves) == int(parts.clipped)


def test_first_update_is_the_plain_policy_gradient():
    """At ratio 1 (old = current) the gradient is -A / n_tok per token: REINFORCE with the group baseline."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    parts = policy_loss(logp, logp.detach(), adv, mask, Objective(), mask.sum().double(), torch.tensor(2.0))
    (grad,) = torch.autograd.grad(parts.loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[-2 / 3, -2 / 3], [1 / 3, 0.0]], dtype=torch.float64))
    assert int(parts.clipped) == 0
