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

import functools

import torch
import torch.nn.functional as F

from ..runtime.errors import UserError

FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32
# Midpoints between consecutive non-negative E2M1 values: a magnitude at or above the k-th one
# rounds to at least code k + 1 (ties away from zero).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


class MXFP4Error(UserError):
    """Shapes that are not MXFP4 (one line, exit 2 in the scripts)."""


@functools.cache
def _byte_values(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 2]: the two E2M1 values a byte holds (low nibble first), made once per device and
    dtype (not copied to the device at every dequantize)."""
    v, b = torch.tensor(FP4_VALUES, dtype=torch.float64), torch.arange(256)
    return torch.stack([v[b & 0x0F], v[b >> 4]], dim=-1).to(device=device, dtype=dtype)


def _scale_values(scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2^(s - 127) for E8M0 bytes s, built from the fp32 bit pattern (exact; byte 0 is the
    subnormal 2^-127, byte 255 infinity), in `dtype`."""
    bits = scales.to(torch.int32) << 23
    bits = torch.where(scales == 0, torch.full_like(bits, 1 << 22), bits)
    return bits.view(torch.float32).to(dtype)


def dequantize_mxfp4(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    transposed: bool = False,
) -> torch.Tensor:
    """blocks uint8 [E, out, in/32, 16], scales uint8 [E, out, in/32] -> [E, in, out] (HF layout),
    or [E, out, in] with transposed (the layout the blocks are stored in: no transposing copy).

    Each value is one E2M1 value times a power of two, so computing in `dtype` rounds once, like
    computing in fp32 and casting (the product is exact wherever fp32 holds it). Working memory
    besides the result: an int32 index per byte and the values, about 4 bytes per element in bf16."""
    E, out_dim, nb, sixteen = blocks.shape
    if sixteen != 16 or tuple(scales.shape) != (E, out_dim, nb):
        raise MXFP4Error(
            f"MXFP4 shapes do not match: blocks {list(blocks.shape)}, scales {list(scales.shape)}"
        )
    vals = F.embedding(blocks.to(torch.int32), _byte_values(blocks.device, dtype))  # [E, out, nb, 16, 2]
    vals = vals.view(E, out_dim, nb, 32).mul_(_scale_values(scales, dtype).unsqueeze(-1))
    vals = vals.view(E, out_dim, nb * 32)
    if transposed:
        return vals
    out = torch.empty(E, nb * 32, out_dim, dtype=dtype, device=blocks.device)
    return out.copy_(vals.transpose(1, 2))  # [E, in, out]


CHUNK_ELEMS = 1 << 25  # dequantize_experts: experts per chunk so that a chunk has at most this many values


def dequantize_experts(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, transposed: bool = False
) -> torch.Tensor:
    """dequantize_mxfp4 (the same values) a few experts at a time: the full-precision result of
    all E experts is the only large allocation, not the temporaries of all of them."""
    E, out_dim, nb, _ = blocks.shape
    per = max(1, CHUNK_ELEMS // max(out_dim * nb * 32, 1))
    if per >= E:
        return dequantize_mxfp4(blocks, scales, dtype, transposed)
    shape = (E, out_dim, nb * 32) if transposed else (E, nb * 32, out_dim)
    out = torch.empty(shape, dtype=dtype, device=blocks.device)
    for e in range(0, E, per):
        part = dequantize_mxfp4(
            blocks[e : e + per], scales[e : e + per], dtype, transposed=True
        )  # [e, out, in]
        out[e : e + per].copy_(part if transposed else part.transpose(1, 2))  # one copy into the result
    return out


class FrozenMXFP4Linear(torch.autograd.Function):
    """y = linear(x, W, b) for a frozen expert weight W held as MXFP4 blocks and scales (uint8):
    W is dequantized just in time in the forward and again in backward, and only the uint8
    tensors are saved, so no full-precision copy of the experts outlives one GEMM. Under
    activation checkpointing the recompute dequantizes once more. The weight and bias are frozen
    (a LoRA base): the only gradient is the input's, linear(g, W^T, 0).

    linear(x, w [E, in, out], b [E, out]) -> [R, out] runs the GEMMs (the experts' grouped linear
    on their sorted rows, with their counts and kernel)."""

    @staticmethod
    def forward(ctx, x, blocks, scales, bias, linear):
        ctx.save_for_backward(blocks, scales)
        ctx.linear = linear
        ctx.in_dim = blocks.shape[2] * 32
        return linear(x, dequantize_experts(blocks, scales, x.dtype), bias.to(x.dtype))

    @staticmethod
    def backward(ctx, g):
        blocks, scales = ctx.saved_tensors
        wt = dequantize_experts(blocks, scales, g.dtype, transposed=True)  # [E, out, in] = W^T
        zero = g.new_zeros(wt.shape[0], ctx.in_dim)
        return ctx.linear(g.contiguous(), wt, zero), None, None, None, None


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
