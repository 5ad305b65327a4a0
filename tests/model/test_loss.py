"""The fused lm_head + cross-entropy (loss.py)."""

import pytest
import torch

from gptoss_titan.model.loss import IGNORE_INDEX, fused_linear_cross_entropy


@pytest.mark.parametrize("chunk", [1 << 6, 1 << 10, 1 << 25])
def test_fused_cross_entropy(chunk):
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(100, 16, requires_grad=True)
    t = torch.randint(0, 100, (37,))
    t[5] = IGNORE_INDEX
    loss = fused_linear_cross_entropy(h, w, t, chunk)
    ref = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum", ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, ref)
    (2.5 * loss).backward()
    gh, gw = torch.autograd.grad(2.5 * ref, [h, w])
    torch.testing.assert_close(h.grad, gh)
    torch.testing.assert_close(w.grad, gw)
