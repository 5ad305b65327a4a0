"""Per-token log-probabilities through the lm_head (model/logprobs.py) against the direct definition
(log_softmax of full logits), in fp64: values, entropies and gradients, chunked or not, on both
paths, with ignored rows; and through Transformer.forward."""

import pytest
import torch

from gptoss_titan.model.logprobs import token_logprobs
from gptoss_titan.model.loss import IGNORE_INDEX

from ..conftest import build, tiny_args


def direct(h, w, t, temperature):
    z = (h @ w.T) / temperature
    lp = torch.log_softmax(z, -1)
    valid = t != IGNORE_INDEX
    picked = lp.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1) * valid
    ent = -(lp.exp() * lp).sum(-1) * valid
    return picked, ent


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [None, 40])  # 40 elements over V = 13: 3 rows per chunk
@pytest.mark.parametrize("path", ["cpu", "accel"])
def test_token_logprobs_match_log_softmax_fp64(temperature, chunk, path):
    g = torch.Generator().manual_seed(0)
    M, H, V = 11, 6, 13
    h = torch.randn(M, H, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, V, (M,), generator=g)
    t[[2, 7]] = IGNORE_INDEX
    weights = torch.randn(M, dtype=torch.float64, generator=g)  # what a loss would bring back

    # both paths hold logits in fp32 (a few ulps of values of order 10 after the chunk's sums)
    hh, ww = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    lp, ent = token_logprobs(hh, ww, t, temperature, chunk, path)
    ref_lp, ref_ent = direct(h, w, t, temperature)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp.double(), ref_lp, **tol)
    torch.testing.assert_close(ent.double(), ref_ent, **tol)
    assert not ent.requires_grad and lp[2] == 0 and lp[7] == 0

    gh, gw = torch.autograd.grad((lp.double() * weights).sum(), (hh, ww))
    rh, rw = torch.autograd.grad((ref_lp * weights).sum(), (h, w))
    torch.testing.assert_close(gh.double(), rh, **tol)
    torch.testing.assert_close(gw.double(), rw, **tol)


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature 0"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long), 0.0)


def test_transformer_forward_returns_the_targets_logprobs():
    torch.manual_seed(0)
    model = build(tiny_args()).double()
    x = torch.randint(0, 256, (2, 9))
    y = torch.randint(0, 256, (2, 9))
    y[0, :3] = IGNORE_INDEX
    lp, ent, counts = model(x, y, logprob_temperature=0.9)
    logits = model(x).double() / 0.9
    ref = torch.log_softmax(logits, -1).gather(2, y.clamp(min=0).unsqueeze(2)).squeeze(2) * (
        y != IGNORE_INDEX
    )
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5)
    assert lp.shape == ent.shape == (2, 9) and counts.shape == (2, 4)
    lp.sum().backward()
    assert model.layers[0].attention.wq.weight.grad is not None


def test_target_rows_limit_the_head_to_those_positions():
    """target_rows: the same values and gradients at those positions, 0 elsewhere."""
    torch.manual_seed(0)
    model = build(tiny_args())
    x = torch.randint(0, 256, (2, 9))
    y = torch.randint(0, 256, (2, 9))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 4:7], mask[1, 2:9] = True, True
    y = torch.where(mask, y, IGNORE_INDEX)
    full, ent_full, _ = model(x, y, logprob_temperature=1.0)
    g_full = torch.autograd.grad(full.sum(), model.output.weight)[0]
    rows = mask.reshape(-1).nonzero().squeeze(1)
    part, ent, _ = model(x, y, logprob_temperature=1.0, target_rows=rows)
    g_part = torch.autograd.grad(part.sum(), model.output.weight)[0]
    # the same rows through GEMMs of another height: equal to a few fp32 ulps (kernels may block differently)
    torch.testing.assert_close(part, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, ent_full, rtol=1e-6, atol=1e-6)
    assert bool((part[~mask] == 0).all())
    torch.testing.assert_close(g_part, g_full, rtol=1e-5, atol=1e-7)
    # the training loss (fused lm_head + cross-entropy): the summed loss and every gradient
    params = [p for p in model.parameters() if p.requires_grad]
    ce_full, ce_part = model(x, y)[0], model(x, y, target_rows=rows)[0]
    torch.testing.assert_close(ce_part, ce_full, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(ce_part, params), torch.autograd.grad(ce_full, params)):
        # other GEMM heights block the sums differently: rounding on the tensor's scale (an element
        # whose terms cancel keeps only that absolute error)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_backward_uses_the_forward_compute_dtype():
    """bf16 autocast in forward, backward outside it (as the trainer runs it): on the accelerator
    path backward recomputes the logits in forward's dtype, so its softmax (with forward's
    log-sum-exp) sums to 1 and the gradient matches one taken entirely in that dtype."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 8, generator=g).requires_grad_()
    w = torch.randn(10, 8, generator=g).requires_grad_()
    t = torch.randint(0, 10, (6,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _ = token_logprobs(h, w, t, 1.0, None, "accel")
    gh, gw = torch.autograd.grad(lp.sum(), (h, w))
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    lpb, _ = token_logprobs(hb, wb, t, 1.0, None, "accel")
    ghb, gwb = torch.autograd.grad(lpb.sum(), (hb, wb))
    torch.testing.assert_close(lp, lpb)
    torch.testing.assert_close(gh, ghb.float(), rtol=2e-2, atol=2e-2)  # bf16 outputs of the same GEMMs
    torch.testing.assert_close(gw, gwb.float(), rtol=2e-2, atol=2e-2)


def test_sampling_logits_are_fp32_from_the_log_prob_paths_gemm():
    """Under bf16 autocast, the last position's logits (what sampling reads) come in fp32 from the
    GEMM the log-prob path uses, so their log-softmax at a token is the trained log-prob up to the
    summation order of the softmax (fp32: a few ulps), not a bf16 rounding (~4e-2 at |z| ~ 10)."""
    from gptoss_titan.model.logprobs import head_logits

    torch.manual_seed(0)
    h = torch.randn(3, 1, 32).bfloat16()
    w = torch.randn(500, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = head_logits(h, w)  # [3, 1, 500]
        t = torch.tensor([7, 123, 499])
        logp, _ = token_logprobs(h.reshape(3, 32), w, t, temperature=0.7)
    assert z.dtype == torch.float32 and z.shape == (3, 1, 500)
    picked = torch.log_softmax(z[:, 0] / 0.7, -1).gather(1, t.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(picked, logp, rtol=0, atol=1e-5)
    bf16 = torch.log_softmax((h.reshape(3, 32) @ w.bfloat16().T).float() / 0.7, -1).gather(1, t.unsqueeze(1))
    assert (bf16.squeeze(1) - logp).abs().max() > 1e-3  # what bf16 logits would have given
