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


def _add_expert_lora(experts: nn.Module, spec: LoRASpec) -> None:
    r = spec.rank
    for name in EXPERT_MATRICES:
        w = getattr(experts, f"w_{name}")  # [E, in, out]
        E, fan_in, fan_out = w.shape
        experts.register_parameter(
            f"lora_{name}_A", nn.Parameter(torch.empty(E, fan_in, r, device=w.device, dtype=w.dtype))
        )
        experts.register_parameter(
            f"lora_{name}_B", nn.Parameter(torch.empty(E, r, fan_out, device=w.device, dtype=w.dtype))
        )
    experts.lora_scale = spec.scale


def add_lora(model: nn.Module, spec: LoRASpec) -> None:
    """Adapters on `spec.targets` of `spec.layers` (all when empty); the rest frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = set(spec.layers)
    for block in model.blocks():
        if chosen and block.layer_id not in chosen:
            continue
        if "attention" in spec.targets:
            for name in ATTENTION:
                _wrap_linear(getattr(block.attention, name), spec)
        if "router" in spec.targets:
            _wrap_linear(block.moe.router.gate, spec)
        if "experts" in spec.targets:
            _add_expert_lora(block.moe.experts, spec)
    model.lora = spec


def is_adapter(name: str) -> bool:
    """Whether a parameter name (any wrapping) is an adapter's."""
    return ".lora_" in name or name.startswith("lora_")


def init_spec(name: str, param: torch.Tensor) -> tuple[str, float]:
    """How an adapter starts: B zero (the base's output exactly), A ~ N(0, 1/in)."""
    if name.endswith("_B") or name.endswith("lora_B"):
        return "zeros", 0.0
    fan_in = param.shape[-2] if param.ndim == 3 else param.shape[-1]  # experts: [E, in, r]; linear: [r, in]
    return "normal", 1.0 / math.sqrt(fan_in)


@torch.no_grad()
def merged_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A full (unsharded) adapter model's state dict -> the base's names with every adapter merged
    in: W + s B A for a linear layer ([out, in]), W_e + s A_e B_e per expert ([E, in, out]),
    computed in at least fp32 and stored in each weight's dtype."""
    out = {k: v for k, v in state.items() if not is_adapter(k)}
    for k in state:
        wide = torch.promote_types(state[k].dtype, torch.float32)
        if k.endswith(".lora_A"):  # a LoRALinear: [r, in], [out, r]
            owner = k[: -len("lora_A")]
            name, delta = owner + "weight", state[owner + "lora_B"].to(wide) @ state[k].to(wide)
        elif is_adapter(k) and k.endswith("_A"):  # experts: [E, in, r], [E, r, out]
            prefix, matrix = k[: -len("_A")].rsplit(".lora_", 1)
            b = state[f"{prefix}.lora_{matrix}_B"].to(wide)
            name, delta = f"{prefix}.w_{matrix}", torch.bmm(state[k].to(wide), b)
        else:
            continue
        out[name] = (out[name].to(wide) + scale * delta).to(out[name].dtype)
    return out
