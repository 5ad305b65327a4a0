"""gpt-oss mixture of experts: top-k router and grouped experts on expert-sorted tokens.

Shape legend: M tokens (B x T flattened), H hidden, E experts, K experts per token,
I expert intermediate size, R = M x K routed rows.

Only routed tokens are computed: the R = M x K (token, expert) pairs are sorted by expert, each
expert multiplies its contiguous slice, and the results are weighted and summed back per token.
Every shape here is a function of the input's shape (counts come from a scatter-add, not a
bincount), so the layer runs under torch.compile and has no host synchronization of its own; the
expert kernel (`GroupedExperts.kernel`, chosen once by `resolve_expert_kernel`) decides how the
GEMMs run. Expert parallelism (parallel/expert_parallel.py) wraps `GroupedExperts.forward`, which
sees only sorted rows and per-expert counts.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.compat import grouped_mm, has_grouped_mm
from ..runtime.dtypes import compute_dtype
from ..runtime.errors import UserError
from . import blas_batch
from .args import EXPERT_KERNELS, ModelArgs
from .balanced_routing import balanced_choice
from .expert_mm import expert_linear
from .local import local
from .mxfp4 import BLOCK, FrozenMXFP4Linear, MXFP4Error, fake_quantize_mxfp4


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    CPU grouped_mm's backward rejects stride-0 (broadcast) gradients, e.g. from `.sum()`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g.contiguous()


@functools.cache
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Probe once per (device, dtype) whether torch._grouped_mm runs forward and backward here."""
    if not has_grouped_mm():
        return False
    # Isolated from the caller: grad on, no autocast, and identity saved-tensor hooks so that an
    # enclosing activation-checkpoint region does not record the probe's tensors.
    isolate = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    try:
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast(device_type, enabled=False),
            isolate,
        ):
            return _probe_grouped_mm(device_type, dtype)
    except (RuntimeError, NotImplementedError):
        return False


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    x = torch.randn(8, 16, device=device_type, dtype=dtype, requires_grad=True)
    w = torch.randn(3, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
    offs = torch.tensor([3, 3, 8], device=device_type, dtype=torch.int32)  # the second expert is empty
    y = grouped_mm(x, w, offs)
    ref = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
    _ContiguousGrad.apply(y).sum().backward()
    return bool(torch.allclose(y, ref, atol=1e-2, rtol=1e-2))


def resolve_expert_kernel(
    requested: str,
    device_type: str,
    dtype: torch.dtype,
    local_experts: int,
    rows: int,
    widths: dict[str, int] | None = None,
) -> tuple[str, str]:
    """The expert kernel to use and why, once per model: (kernel, reason).

    requested: a name from EXPERT_KERNELS; dtype: the compute dtype of the experts; local_experts:
    experts on this rank; rows: routed rows per forward on this rank (tokens x K), for "auto".
    auto: CPU -> "batched" for many experts with few rows each where MKL's batch GEMM exists
    (fp32/fp64), else "loop"; CUDA -> "grouped" in bf16, "loop" in fp32 (there _grouped_mm falls
    back to one GEMM per expert and copies the offsets to the host). widths: the experts' GEMM
    row widths on this rank (name -> elements: hidden, 2I and I per tensor-parallel rank), which
    _grouped_mm needs in whole 16-byte rows. Raises ValueError for a kernel that cannot run here.
    """
    if requested not in EXPERT_KERNELS:
        raise ValueError(f"model.expert_kernel = {requested!r} is not one of {', '.join(EXPERT_KERNELS)}")
    batch_ok = device_type == "cpu" and blas_batch.available(dtype)
    if requested == "batched" and not batch_ok:
        raise ValueError(
            f"model.expert_kernel = 'batched' needs the CPU and MKL's batched GEMM for {dtype} "
            "(x86-64 Linux builds, fp32/fp64); use 'loop' or 'auto'"
        )
    if requested == "grouped" and not grouped_mm_works(device_type, dtype):
        raise ValueError(
            f"model.expert_kernel = 'grouped': torch._grouped_mm does not run for {dtype} on "
            f"{device_type} with this torch; use 'loop' or 'auto'"
        )
    if requested in ("grouped", "auto") and device_type != "cpu":
        per_row = 16 // dtype.itemsize  # elements in 16 bytes
        odd = {k: v for k, v in (widths or {}).items() if v % per_row}
        if odd and requested == "grouped":
            raise ValueError(
                "model.expert_kernel = 'grouped': torch._grouped_mm needs expert widths in whole 16-byte rows "
                f"(multiples of {per_row} in {dtype}); this rank has "
                + ", ".join(f"{k} = {v}" for k, v in odd.items())
                + "; change the shape or use 'loop' or 'auto'"
            )
        if odd:
            return (
                "loop",
                f"one GEMM per expert (widths {', '.join(f'{k} = {v}' for k, v in odd.items())} are not 16-byte rows for _grouped_mm)",
            )
    if requested != "auto":
        return requested, "set in the config"
    if device_type == "cpu":
        if batch_ok and blas_batch.worth_batching(local_experts, rows):
            return (
                "batched",
                f"{local_experts} experts x ~{rows // max(local_experts, 1)} rows: one MKL batch call",
            )
        return "loop", "one GEMM per expert (CPU)"
    if dtype == torch.bfloat16 and grouped_mm_works(device_type, dtype):
        return "grouped", f"torch._grouped_mm in {dtype}"
    return "loop", f"one GEMM per expert ({dtype}: no fast grouped GEMM here)"


def compile_ready_kernel(kernel: str, device_type: str, dtype: torch.dtype) -> str:
    """The expert kernel for a fullgraph-compiled forward (the sampler's decode step): off the CPU
    the "loop" kernel reads the per-expert counts on the host (a graph break), so it becomes
    "grouped" (in fp32 _grouped_mm's own per-expert fallback, slower but inside the graph); the
    CPU kernels are custom ops and stay. A UserError (one line) where no compilable kernel exists."""
    if device_type == "cpu" or kernel != "loop":
        return kernel
    if not grouped_mm_works(device_type, dtype):
        raise UserError(
            f"--compile: the experts need torch._grouped_mm for {dtype} on {device_type}, which this torch lacks; "
            "sample without --compile, or in bfloat16"
        )
    return "grouped"


def _grouped_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    counts: torch.Tensor,
    kernel: str,
    expert_of_row: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [R, in] sorted by expert, w [E, in, out], b [E, out], counts [E] -> [R, out]; row r uses its expert's w, b.

    kernel "grouped": one torch._grouped_mm, the bias added per row through `expert_of_row` [R].
    "loop" / "batched" on CPU: the custom op of expert_mm.py (one addmm per expert, or all of them
    in one batched BLAS call); "loop" elsewhere: `_loop_linear`.
    """
    if kernel == "grouped":
        if expert_of_row is None:
            expert_of_row = _expert_of_row(counts, x.shape[0])
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)  # [E] end row of each expert
        return _ContiguousGrad.apply(grouped_mm(x, w, offs)) + b[expert_of_row]
    if x.device.type == "cpu":
        return expert_linear(x, w, b, counts, kernel == "batched")
    return _loop_linear(x, w, b, counts)


def _loop_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """One matmul per expert that has rows, in plain torch ops (any device; syncs for the split sizes)."""
    chunks = torch.split(x, counts.tolist(), dim=0)  # host sync for the split sizes
    # unbind, not w[e]: its backward stacks the E gradients once instead of E full-size zero tensors
    out = [
        c @ we + be if c.shape[0] else c.new_empty(0, w.shape[-1])
        for c, we, be in zip(chunks, w.unbind(0), b.unbind(0))
    ]
    return torch.cat(out, dim=0)


def _expert_of_row(counts: torch.Tensor, n_rows: int) -> torch.Tensor:
    """[R] the expert of each sorted row (output_size given: no host sync)."""
    return torch.repeat_interleave(
        torch.arange(counts.numel(), device=counts.device), counts, output_size=n_rows
    )


def _swiglu_math(u: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    gate = u[..., 0::2].clamp(max=limit)
    up = u[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


class _ClampedSwiGLU(torch.autograd.Function):
    """Keeps only its input for backward and recomputes the element-wise terms there: autograd
    through `_swiglu_math` keeps five more [R, I] tensors (clamped gate and up, up + 1, the
    sigmoid, a product), 7 I values per routed row instead of 2 I (the MoE runs eagerly, so no
    compiler removes them). Gradients as autograd's: clamp passes its gradient where the input is
    within the bounds, inclusive."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(u)
        ctx.limit, ctx.alpha = limit, alpha
        return _swiglu_math(u, limit, alpha)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (u,) = ctx.saved_tensors
        limit, alpha = ctx.limit, ctx.alpha
        gate_in, up_in = u[..., 0::2], u[..., 1::2]
        gate, up = gate_in.clamp(max=limit), up_in.clamp(min=-limit, max=limit)
        s = torch.sigmoid(alpha * gate)
        d_gate = g * (up + 1) * (s + alpha * gate * s * (1 - s)) * (gate_in <= limit)
        d_up = g * gate * s * ((up_in >= -limit) & (up_in <= limit))
        return torch.stack([d_gate, d_up], dim=-1).flatten(-2), None, None  # interleaved again


def clamped_swiglu(u: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """u [R, 2I] interleaved (gate_j, up_j) -> [R, I]: (clamp(up) + 1) * g * sigmoid(alpha g), g = min(gate, limit)."""
    if not torch.is_grad_enabled() or not u.requires_grad:
        return _swiglu_math(u, limit, alpha)
    return _ClampedSwiGLU.apply(u, limit, alpha)


class GroupedExperts(nn.Module):
    """E experts with the Hugging Face [in, out] layout: gate_up interleaved, biases per expert."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, H, I = args.num_experts, args.dim, args.moe_inter_dim
        self.w_gate_up = nn.Parameter(torch.empty(E, H, 2 * I))  # [E, H, 2I]
        self.b_gate_up = nn.Parameter(torch.empty(E, 2 * I))  # [E, 2I]
        self.w_down = nn.Parameter(torch.empty(E, I, H))  # [E, I, H]
        self.b_down = nn.Parameter(torch.empty(E, H))  # [E, H]
        self.limit, self.alpha = args.swiglu_limit, args.swiglu_alpha
        self.kernel = "loop"  # works everywhere; Transformer.set_expert_kernel picks the fast one
        self.mxfp4_qat = False  # Transformer.set_mxfp4_qat: the forward sees MXFP4-rounded weights
        self.mxfp4_base = False  # freeze_as_mxfp4: frozen uint8 weights, dequantized per layer
        self.lora_scale = 0.0  # > 0: rank-r adapters per expert (model/lora.py adds lora_*_A, lora_*_B)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [R, H] rows sorted by expert; counts [E] rows per expert (sum R) -> [R, H]."""
        x = x.to(compute_dtype(x))  # grouped_mm and the CPU op are not autocast-aware (the weights follow x)
        rows = _expert_of_row(counts, x.shape[0]) if self.kernel == "grouped" else None  # once for both GEMMs
        u = self._base("gate_up", x, counts, rows)  # [R, 2I]
        if self.lora_scale and hasattr(self, "lora_gate_up_A"):
            u = u + self._adapter("gate_up", x, counts, rows)
        z = clamped_swiglu(u, self.limit, self.alpha)  # [R, I]
        y = self._base("down", z, counts, rows)  # [R, H]
        if self.lora_scale and hasattr(self, "lora_down_A"):
            y = y + self._adapter("down", z, counts, rows)
        return y

    def _base(
        self, name: str, x: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor | None
    ) -> torch.Tensor:
        """One expert matrix with its bias on the sorted rows. Under expert parallelism the
        parameters are DTensors sharded by expert: the local experts are used."""
        b = local(getattr(self, f"b_{name}"))
        if self.mxfp4_base:  # frozen uint8 blocks and scales, dequantized just in time
            blocks, scales = (local(getattr(self, f"w_{name}_{part}")) for part in ("blocks", "scales"))

            def linear(x, w, b):
                return _grouped_linear(x, w, b, counts, self.kernel, rows)

            return FrozenMXFP4Linear.apply(x, blocks, scales, b, linear)
        w = local(getattr(self, f"w_{name}"))
        if self.mxfp4_qat:  # the values an MXFP4 export will hold, straight-through gradients
            w = fake_quantize_mxfp4(w)
        return _grouped_linear(x, w.to(x.dtype), b.to(x.dtype), counts, self.kernel, rows)

    def freeze_as_mxfp4(self) -> None:
        """Hold the expert weights as frozen MXFP4 blocks and scales (uint8, the released
        checkpoints' layout: blocks [E, out, in/32, 16], scales [E, out, in/32]) in place of
        w_gate_up and w_down; the forward dequantizes them per layer (FrozenMXFP4Linear). For a
        LoRA base, before the parallel passes (which shard them like any parameter); the values
        come from a checkpoint (interop/convert.py: load_hf_into)."""
        for name in ("gate_up", "down"):
            w = self._parameters.pop(f"w_{name}")
            E, fan_in, fan_out = w.shape
            if fan_in % BLOCK:
                raise MXFP4Error(
                    f"an MXFP4 base needs expert input widths that are multiples of {BLOCK}; got {fan_in}"
                )
            for part, shape in (
                ("blocks", (E, fan_out, fan_in // BLOCK, 16)),
                ("scales", (E, fan_out, fan_in // BLOCK)),
            ):
                t = torch.empty(shape, dtype=torch.uint8, device=w.device)
                self.register_parameter(f"w_{name}_{part}", nn.Parameter(t, requires_grad=False))
        self.mxfp4_base = True

    def _adapter(
        self, name: str, x: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor | None
    ) -> torch.Tensor:
        """The LoRA term of one expert matrix: s (x A_e) B_e per row, on the same sorted rows."""
        a = local(getattr(self, f"lora_{name}_A")).to(x.dtype)  # [E, in, r]
        b = local(getattr(self, f"lora_{name}_B")).to(x.dtype)  # [E, r, out]
        if self.kernel == "grouped":  # no bias to gather; the rank padded with zeros to 16-byte rows
            pad = -a.shape[2] % (16 // x.element_size())  # (grouped_mm's stride rule; exact, no host sync)
            a, b = F.pad(a, (0, pad)), F.pad(b, (0, 0, 0, pad))
            offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
            h = _ContiguousGrad.apply(grouped_mm(x, a, offs))  # [R, r]
            return _ContiguousGrad.apply(grouped_mm(h, b, offs)) * self.lora_scale
        h = _grouped_linear(x, a, a.new_zeros(a.shape[0], a.shape[2]), counts, self.kernel, rows)  # [R, r]
        return (
            _grouped_linear(h, b, b.new_zeros(b.shape[0], b.shape[2]), counts, self.kernel, rows)
            * self.lora_scale
        )


class Router(nn.Module):
    """Top-K of E linear logits; weights = softmax over the K chosen logits only (in fp32, or fp64
    for an fp64 model: exact against the reference there)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.top_k
        self.gate = nn.Linear(args.dim, args.num_experts, bias=True)
        # Auxiliary-loss-free balancing: shifts the top-k choice only, never the weights.
        self.expert_bias: torch.Tensor | None
        if args.load_balance_bias:
            self.register_buffer("expert_bias", torch.zeros(args.num_experts), persistent=True)
        else:
            self.expert_bias = None
        # Training only: a batch whose plain top-k overloads an expert past this many times the mean
        # is routed by balanced_topk instead (0 = off; the trainer sets 0 when its window ends).
        self.balanced_routing = args.balanced_routing
        if args.balanced_routing:  # the plain top-k's loads (for the bias) and the fallbacks taken
            self.register_buffer("choice_counts", torch.zeros(args.num_experts + 1, dtype=torch.int64), False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [M, H] -> weights [M, K] (at least fp32), experts [M, K], logits [M, E]."""
        logits = self.gate(x)  # [M, E]
        scores = logits if self.expert_bias is None else logits + self.expert_bias
        _, idx = torch.topk(scores, self.top_k, dim=-1)  # [M, K]
        if self.training and self.balanced_routing:  # the tally: see balanced_choice
            idx, tally = balanced_choice(scores.detach(), idx, self.balanced_routing)
            self.choice_counts += tally
        chosen = logits.gather(-1, idx)  # [M, K]
        weights = torch.softmax(chosen.to(torch.promote_types(chosen.dtype, torch.float32)), dim=-1)
        return weights, idx, logits


class MoE(nn.Module):
    """Router + experts. Returns the output and routing statistics for balancing and metrics."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_experts = args.num_experts
        self.router = Router(args)
        self.experts = GroupedExperts(args)

    def forward(self, x: torch.Tensor, need_probs: bool = False):
        """x [B, T, H] -> (out [B, T, H], counts [E] (int), prob_sum [E] or None).

        counts: how many of the B x T x K assignments went to each expert (no gradient).
        prob_sum: column sums of the full softmax over E router logits (for the HF aux loss).
        """
        B, T, H = x.shape
        K = self.router.top_k
        x = x.reshape(B * T, H)  # [M, H]
        weights, idx, logits = self.router(x)  # [M, K], [M, K], [M, E]
        flat = idx.reshape(-1)  # [R] expert of row r = token r // K, choice r % K
        order = torch.argsort(flat, stable=True)  # [R] rows sorted by expert
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat)
        )  # [E] (a bincount with a static shape and no host sync)
        y = self.experts(x[order // K], counts)  # [R, H] in expert order
        y = y * weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)  # [R, H] weighted, bias included
        # Back to (token, choice) order, then sum the K choices of each token in a fixed order:
        # deterministic on every device (no atomics, unlike an index_add over tokens).
        y = torch.zeros_like(y).index_copy(0, order, y)  # [R, H]
        out = y.view(B * T, K, H).sum(1)  # [M, H]
        prob_sum = torch.softmax(logits.float(), dim=-1).sum(0) if need_probs else None  # [E]
        return out.reshape(B, T, H).to(x.dtype), counts, prob_sum
