"""MXFP4, the released checkpoints' expert format: decode, encode, and fake quantization for QAT.

Layout (OCP Microscaling, E2M1 elements with one E8M0 scale per 32 values along the `in` dim):
blocks uint8 [E, out, in/32, 16], scales uint8 [E, out, in/32]; byte j of a block holds element
2j in its low nibble and 2j+1 in its high nibble; value = FP4_VALUES[nibble] x 2^(scale - 127).

Encoding matches OpenAI's triton_kernels quantizer that transformers uses to write MXFP4
(`downcast_to_mxfp`, default scale rounding "round up"), checked value by value in the tests:
- the scale is the smallest power of two 2^e with max|x| / 2^e <= 6 (E2M1's largest value),
  computed from the fp32 quotient max|x| / 6 (a block of zeros gets scale byte 0);
- each x / 2^e rounds to the nearest E2M1 value, ties away from zero, saturating at +-6; the sign
  is kept, so a small negative value becomes -0 (nibble 8).
"""

from __future__ import annotations

import torch

from ..runtime.errors import UserError

FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32
# Midpoints between consecutive non-negative E2M1 values: a magnitude at or above the k-th one
# rounds to at least code k + 1 (ties away from zero).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


class MXFP4Error(UserError):
    """Shapes that are not MXFP4 (one line, exit 2 in the scripts)."""


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """blocks uint8 [E, out, in/32, 16], scales uint8 [E, out, in/32] -> [E, in, out] (HF layout)."""
    E, out_dim, nb, sixteen = blocks.shape
    if sixteen != 16 or tuple(scales.shape) != (E, out_dim, nb):
        raise MXFP4Error(
            f"MXFP4 shapes do not match: blocks {list(blocks.shape)}, scales {list(scales.shape)}"
        )
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    lo, hi = (blocks & 0x0F).long(), (blocks >> 4).long()  # [E, out, nb, 16] each
    vals = torch.stack([lut[lo], lut[hi]], dim=-1).reshape(E, out_dim, nb, 32)  # element 2j, 2j+1
    exp = scales.to(torch.int32) - 127  # [E, out, nb]
    vals = torch.ldexp(vals, exp.unsqueeze(-1).to(torch.float32))
    return vals.reshape(E, out_dim, nb * 32).transpose(1, 2).contiguous().to(dtype)  # [E, in, out]


def _scale_exponents(amax: torch.Tensor) -> torch.Tensor:
    """int32 e = ceil(log2(amax / 6)) from the fp32 quotient (exact powers of two stay), clamped to
    the E8M0 range; amax 0 -> -127 (scale byte 0)."""
    q = amax.float() / 6.0
    mant, exp = torch.frexp(q)  # q = mant x 2^exp, mant in [0.5, 1)
    e = torch.where(mant == 0.5, exp - 1, exp).to(torch.int32)
    e = torch.where(q == 0, torch.full_like(e, -127), e)
    return e.clamp(-127, 127)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, in, out] (HF layout; in a multiple of 32) -> (blocks uint8 [E, out, in/32, 16],
    scales uint8 [E, out, in/32])."""
    E, In, Out = w.shape
    if In % BLOCK:
        raise MXFP4Error(f"MXFP4 needs the input dimension to be a multiple of {BLOCK}; got {In}")
    x = w.detach().float().transpose(1, 2).reshape(E, Out, In // BLOCK, BLOCK)  # [E, out, nb, 32]
    e = _scale_exponents(x.abs().amax(-1))  # [E, out, nb]
    q = torch.ldexp(x, (-e).unsqueeze(-1).float())  # x / 2^e, exact
    mag = q.abs()
    code = torch.zeros(mag.shape, dtype=torch.uint8, device=w.device)
    for m in _MIDPOINTS:
        code += (mag >= m).to(torch.uint8)
    code |= torch.signbit(q).to(torch.uint8) << 3
    packed = code[..., 0::2] | (code[..., 1::2] << 4)  # [E, out, nb, 16]
    return packed.contiguous(), (e + 127).to(torch.uint8).contiguous()


def quantize_dequantize(w: torch.Tensor) -> torch.Tensor:
    """The values an MXFP4 export of w holds, as w's dtype: what serving the export computes with.
    w [..., in, out] with the quantization blocks along `in` (dim -2)."""
    shape = w.shape
    w3 = w.reshape(-1, shape[-2], shape[-1])
    blocks, scales = quantize_mxfp4(w3)
    return dequantize_mxfp4(blocks, scales, torch.float32).reshape(shape).to(w.dtype)


class _FakeQuant(torch.autograd.Function):
    """MXFP4 quantize-dequantize in the forward, the identity in backward (straight-through)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        return quantize_dequantize(w)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g


def fake_quantize_mxfp4(w: torch.Tensor) -> torch.Tensor:
    """For MXFP4-aware training: the forward sees the exported values, gradients reach the
    full-precision weights unchanged."""
    return _FakeQuant.apply(w)
