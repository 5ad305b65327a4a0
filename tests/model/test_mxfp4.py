"""MXFP4 encoding: the stated rule (scale = smallest power of two putting max|x| within 6, nearest
E2M1 value with ties away from zero), checked by a brute-force oracle; exact round trips; the
layout transformers decodes; fake quantization's straight-through gradient."""

import math

import pytest
import torch

from gptoss_titan.model.mxfp4 import (
    FP4_VALUES,
    MXFP4Error,
    dequantize_mxfp4,
    fake_quantize_mxfp4,
    quantize_dequantize,
    quantize_mxfp4,
)

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def oracle(w: torch.Tensor) -> torch.Tensor:
    """Element by element in Python floats: [E, in, out] -> the quantize-dequantized values."""
    E, In, Out = w.shape
    out = torch.empty(E, In, Out, dtype=torch.float64)
    for e in range(E):
        for o in range(Out):
            for b in range(In // 32):
                block = [float(w[e, b * 32 + i, o]) for i in range(32)]
                amax = max(abs(v) for v in block)
                q = float(torch.tensor(amax, dtype=torch.float32) / 6.0)  # the fp32 quotient
                k = -127 if q == 0 else max(-127, min(127, math.ceil(math.log2(q))))
                for i, v in enumerate(block):
                    a = abs(v) / 2.0**k
                    best = min(GRID, key=lambda g: (abs(a - g), -g))  # nearest, ties to the larger
                    out[e, b * 32 + i, o] = math.copysign(min(best, 6.0), v) * 2.0**k
    return out


def test_encoding_follows_the_stated_rule():
    torch.manual_seed(0)
    w = torch.randn(2, 64, 3) * torch.logspace(-3, 2, 3)  # different scales per output column
    w[0, :32, 0] = 0.0  # a block of zeros
    w[1, 0, 1] = -1e-9  # rounds to -0
    w[1, 32:64, 2] = torch.tensor([6.0, 5.0, 4.5, 3.5, 2.5, 1.75, 0.75, 0.25] * 4)  # ties and exact values
    got = quantize_dequantize(w).double()
    torch.testing.assert_close(got, oracle(w), rtol=0, atol=0)
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (2, 3, 2, 16) and scales.shape == (2, 3, 2) and blocks.dtype == torch.uint8
    assert scales[0, 0, 0] == 0  # zeros: scale byte 0
    assert (blocks[1, 1, 0, 0] & 0x0F) == 8  # -0 keeps its sign, as the reference quantizer
    # the tie block: max 6 -> scale 2^0; 5 -> 6, 4.5 -> 4, 3.5 -> 4, 2.5 -> 3, 1.75 -> 2, 0.75 -> 1, 0.25 -> 0.5
    assert got[1, 32:40, 2].tolist() == [6.0, 6.0, 4.0, 4.0, 3.0, 2.0, 1.0, 0.5]


def test_round_trip_is_exact_for_representable_values():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (3, 96, 5), generator=g)
    exps = torch.randint(-20, 20, (3, 3, 5), generator=g).repeat_interleave(32, dim=1)
    w = torch.tensor(FP4_VALUES)[codes] * torch.pow(2.0, exps.float())
    torch.testing.assert_close(quantize_dequantize(w), w, rtol=0, atol=0)
    blocks, scales = quantize_mxfp4(w)
    torch.testing.assert_close(dequantize_mxfp4(blocks, scales, torch.float32), quantize_dequantize(w))
    # quantizing what was dequantized changes nothing (bit-identical re-export)
    b2, s2 = quantize_mxfp4(dequantize_mxfp4(blocks, scales, torch.float32))
    assert torch.equal(
        dequantize_mxfp4(b2, s2, torch.float32), dequantize_mxfp4(blocks, scales, torch.float32)
    )


def test_transformers_decodes_our_blocks():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(2)
    w = torch.randn(2, 64, 48)
    blocks, scales = quantize_mxfp4(w)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    torch.testing.assert_close(theirs.float(), quantize_dequantize(w), rtol=0, atol=0)


def test_fake_quantization_is_straight_through():
    w = torch.randn(2, 32, 4, requires_grad=True)
    y = fake_quantize_mxfp4(w)
    torch.testing.assert_close(y, quantize_dequantize(w.detach()))
    g = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, w, g)
    assert torch.equal(gw, g)


def test_bad_shapes():
    with pytest.raises(MXFP4Error, match="multiple of 32"):
        quantize_mxfp4(torch.zeros(1, 40, 2))


def test_mxfp4_qat_forward_is_the_export_and_gradients_pass_straight():
    """With set_mxfp4_qat the model computes what its MXFP4 export computes; the gradients of the
    full-precision expert weights are those of the quantized ones (straight-through)."""
    from tests.conftest import build, tiny_args

    args = tiny_args()
    qat, plain = build(args), build(args)
    with torch.no_grad():
        for layer in plain.layers:
            e = layer.moe.experts
            e.w_gate_up.copy_(quantize_dequantize(e.w_gate_up))
            e.w_down.copy_(quantize_dequantize(e.w_down))
    qat.set_mxfp4_qat(True)
    x = torch.randint(0, args.vocab_size, (2, 24))
    a, b = qat(x, x)[0], plain(x, x)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    a.backward()
    b.backward()
    for (n, p), q in zip(qat.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)
    assert not torch.equal(qat.layers[0].moe.experts.w_gate_up, plain.layers[0].moe.experts.w_gate_up)
