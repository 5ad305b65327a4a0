"""LoRA adapters on a frozen gpt-oss: attention projections, every expert, the router.

`add_lora(model, spec)` turns a built Transformer (any device, meta included: it runs before the
parallel passes) into an adapter model, in place:
- attention wq, wk, wv, wo (and the router's gate) become `LoRALinear`: the same `weight` and
  `bias` (so checkpoint and Hugging Face names do not change) plus `lora_A` [r, in] and `lora_B`
  [out, r]; y = x W^T + b + s (drop(x) A^T) B^T with s = alpha / r;
- the experts get one rank-r pair per expert and matrix, in the experts' own [E, in, out] layout:
  `lora_gate_up_A` [E, H, r], `lora_gate_up_B` [E, r, 2I], `lora_down_A` [E, I, r],
  `lora_down_B` [E, r, H], run on the same expert-sorted rows as the base GEMMs
  (GroupedExperts.forward); expert parallelism shards them by expert like the experts;
- every other parameter stops requiring gradients: the optimizer (which takes only parameters
  that require them) holds the adapters alone, and the base receives no gradient.
B starts at zero, so an adapter model computes exactly the base's logits until it trains; A is
drawn like every parameter (init.py: the same values at any sharding), N(0, 1/in).
PEFT's layout (lora_A [r*E, in], lora_B [out, r*E] for the experts) is the exporter's business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ("attention", "experts", "router")
ATTENTION = ("wq", "wk", "wv", "wo")
EXPERT_MATRICES = ("gate_up", "down")


@dataclass(frozen=True)
class LoRASpec:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    layers: tuple[int, ...] = ()  # empty: every layer
    sites: tuple[
        str, ...
    ] = ()  # explicit places instead of targets x layers (an imported adapter's: sites_of)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """nn.Linear with a rank-r adapter beside its frozen weight (made by `_wrap_linear`)."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_scale: float
    lora_dropout: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        return y + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.lora_scale


def _wrap_linear(m: nn.Linear, spec: LoRASpec) -> None:
    w = m.weight
    m.__class__ = LoRALinear
    m.lora_A = nn.Parameter(torch.empty(spec.rank, m.in_features, device=w.device, dtype=w.dtype))
    m.lora_B = nn.Parameter(torch.empty(m.out_features, spec.rank, device=w.device, dtype=w.dtype))
    m.lora_scale, m.lora_dropout = spec.scale, spec.dropout


def _add_expert_lora(experts: nn.Module, spec: LoRASpec, matrices: list[str]) -> None:
    r = spec.rank
    for name in matrices:
        w = getattr(experts, f"w_{name}")  # [E, in, out]
        E, fan_in, fan_out = w.shape
        experts.register_parameter(
            f"lora_{name}_A", nn.Parameter(torch.empty(E, fan_in, r, device=w.device, dtype=w.dtype))
        )
        experts.register_parameter(
            f"lora_{name}_B", nn.Parameter(torch.empty(E, r, fan_out, device=w.device, dtype=w.dtype))
        )
    experts.lora_scale = spec.scale


def spec_sites(spec: LoRASpec, n_layers: int) -> tuple[str, ...]:
    """Where the adapters of `spec` sit: "layers.L.attention.wq", "layers.L.moe.router.gate",
    "layers.L.moe.experts.gate_up", ... (spec.sites when given, else targets x layers)."""
    if spec.sites:
        return spec.sites
    out = []
    for i in spec.layers or range(n_layers):
        if "attention" in spec.targets:
            out += [f"layers.{i}.attention.{n}" for n in ATTENTION]
        if "router" in spec.targets:
            out.append(f"layers.{i}.moe.router.gate")
        if "experts" in spec.targets:
            out += [f"layers.{i}.moe.experts.{m}" for m in EXPERT_MATRICES]
    return tuple(out)


def sites_of(names) -> tuple[str, ...]:
    """The sites (see spec_sites) of adapter parameter names, e.g. a checkpoint's or a PEFT folder's."""
    out = set()
    for n in names:
        if n.endswith((".lora_A", ".lora_B")):
            out.add(n[: -len(".lora_A")])
        elif is_adapter(n):  # layers.L.moe.experts.lora_gate_up_A
            prefix, _, rest = n.rpartition(".lora_")
            out.add(f"{prefix}.{rest[: -len('_A')]}")
    return tuple(sorted(out))


def add_lora(model: nn.Module, spec: LoRASpec) -> None:
    """Adapters at spec_sites(spec) (of the layers this model holds); every other parameter frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    sites = set(spec_sites(spec, model.args.n_layers))
    for block in model.blocks():
        here = f"layers.{block.layer_id}"
        for name in ATTENTION:
            if f"{here}.attention.{name}" in sites:
                _wrap_linear(getattr(block.attention, name), spec)
        if f"{here}.moe.router.gate" in sites:
            _wrap_linear(block.moe.router.gate, spec)
        if any(f"{here}.moe.experts.{m}" in sites for m in EXPERT_MATRICES):
            _add_expert_lora(
                block.moe.experts, spec, [m for m in EXPERT_MATRICES if f"{here}.moe.experts.{m}" in sites]
            )
    model.lora = spec


def store_base(model: nn.Module, dtype: torch.dtype, mxfp4_experts: bool = False) -> None:
    """Keep the frozen base in `dtype` (bf16 halves it; it is never updated, so no fp32 master
    copy is needed): every parameter but the adapters, before the parallel passes. mxfp4_experts:
    the expert weights as MXFP4 blocks and scales instead (GroupedExperts.freeze_as_mxfp4)."""
    if mxfp4_experts:
        for block in model.blocks():
            block.moe.experts.freeze_as_mxfp4()
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not is_adapter(name) and p.dtype != dtype and p.is_floating_point():
                module.register_parameter(name, nn.Parameter(p.detach().to(dtype), requires_grad=False))


def is_adapter(name: str) -> bool:
    """Whether a parameter name (any wrapping) is an adapter's."""
    return ".lora_" in name or name.startswith("lora_")


def init_spec(name: str, param: torch.Tensor) -> tuple[str, float]:
    """How an adapter starts: B zero (the base's output exactly), A ~ N(0, 1/in)."""
    if name.endswith("_B") or name.endswith("lora_B"):
        return "zeros", 0.0
    fan_in = param.shape[-2] if param.ndim == 3 else param.shape[-1]  # experts: [E, in, r]; linear: [r, in]
    return "normal", 1.0 / math.sqrt(fan_in)


def weight_delta(name: str, adapters: dict[str, torch.Tensor], scale: float) -> torch.Tensor | None:
    """The update the adapters make to the base weight `name` (model state names), in at least
    fp32: s B A for a linear layer ([out, in]), s A_e B_e per expert ([E, in, out]); None when no
    adapter sits on it."""
    if name.endswith(".weight") and name[: -len("weight")] + "lora_A" in adapters:
        owner = name[: -len("weight")]
        a, b = adapters[owner + "lora_A"], adapters[owner + "lora_B"]
        wide = torch.promote_types(a.dtype, torch.float32)
        return scale * (b.to(wide) @ a.to(wide))
    prefix, _, matrix = name.rpartition(".w_")
    if matrix in EXPERT_MATRICES and f"{prefix}.lora_{matrix}_A" in adapters:
        a, b = adapters[f"{prefix}.lora_{matrix}_A"], adapters[f"{prefix}.lora_{matrix}_B"]
        wide = torch.promote_types(a.dtype, torch.float32)
        return scale * torch.bmm(a.to(wide), b.to(wide))
    return None


@torch.no_grad()
def merged_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A full (unsharded) adapter model's state dict -> the base's names with every adapter merged
    in (weight_delta), each weight kept in its dtype."""
    adapters = {k: v for k, v in state.items() if is_adapter(k)}
    out = {}
    for k, v in state.items():
        if not is_adapter(k):
            delta = weight_delta(k, adapters, scale)
            out[k] = v if delta is None else (v.to(delta.dtype) + delta).to(v.dtype)
    return out
