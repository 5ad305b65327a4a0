"""LoRA adapters in PEFT's format (peft >= 0.21), both ways.

PEFT puts LoRA on gpt-oss's attention through `target_modules` (q_proj, k_proj, v_proj, o_proj:
lora_A [r, in], lora_B [out, r]) and on its expert and router parameters through
`target_parameters` ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.router.weight").
For a 3-D expert parameter [E, in, out] its lora_A is [r*E, in] with expert e's rows at
e*r .. e*r + r - 1, and lora_B is [out, r*E] with expert e's columns at k*E + e (k < r): expert
e's update is s * A_e^T B_e^T as an [in, out] matrix, which is our [E, in, r] @ [E, r, out] per
expert. Two parameters of one module nest: PEFT wraps them in registration order, so with both
targeted down_proj's adapter is `mlp.experts.lora_*` and gate_up_proj's
`mlp.experts.base_layer.lora_*`; a layer with one of them has it at `mlp.experts.lora_*`. Keys carry
the prefix "base_model.model." and no adapter name. PEFT refuses dropout on parameter targets:
the exported config says 0 (dropout acts only in training).
"""

from __future__ import annotations

import re

import torch

from ..model import ModelArgs
from ..model.lora import sites_of
from .files import ConvertError

PREFIX = "base_model.model.model.layers."
ATTENTION = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
EXPERT_PARAM = {"gate_up": "gate_up_proj", "down": "down_proj"}
_OURS = re.compile(
    r"layers\.(\d+)\.(?:attention\.(wq|wk|wv|wo)\.lora_([AB])|moe\.router\.gate\.lora_([AB])"
    r"|moe\.experts\.lora_(gate_up|down)_([AB]))$"
)
_THEIRS = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn\.([qkvo])_proj|mlp\.(router)"
    r"|(mlp\.experts\.base_layer|mlp\.experts))\.lora_([AB])\.weight$"
)


def to_peft(adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our adapter tensors (model state names) -> PEFT's adapter_model.safetensors tensors."""
    out, both = {}, _layers_with_both(adapters)
    for name, t in adapters.items():
        m = _OURS.match(name)
        if m is None:
            raise ConvertError(f"{name!r} is not a LoRA adapter this exporter knows")
        layer, proj, ab_attn, ab_router, matrix, ab_expert = m.groups()
        if proj:
            out[f"{PREFIX}{layer}.self_attn.{ATTENTION[proj]}.lora_{ab_attn}.weight"] = t
        elif ab_router:
            out[f"{PREFIX}{layer}.mlp.router.lora_{ab_router}.weight"] = t
        else:
            E = t.shape[0]
            if ab_expert == "A":  # [E, in, r] -> [r*E, in], expert-major rows
                t = t.permute(0, 2, 1).reshape(E * t.shape[2], t.shape[1])
            else:  # [E, r, out] -> [out, r*E], column k*E + e
                t = t.permute(2, 1, 0).reshape(t.shape[2], t.shape[1] * E)
            module = "mlp.experts.base_layer" if matrix == "gate_up" and layer in both else "mlp.experts"
            out[f"{PREFIX}{layer}.{module}.lora_{ab_expert}.weight"] = t
    return {k: v.contiguous() for k, v in out.items()}


def from_peft(tensors: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """PEFT adapter tensors of a gpt-oss model -> ours (model state names, our layouts)."""
    E, out = args.num_experts, {}
    proj_of = {v[0]: k for k, v in ATTENTION.items()}
    for key, t in tensors.items():
        m = _THEIRS.match(key)
        if m is None:
            raise ConvertError(
                f"adapter tensor {key!r} is not LoRA on gpt-oss attention, experts or router; "
                "export adapters with target_modules q/k/v/o_proj and target_parameters of mlp.experts, mlp.router"
            )
        layer, proj, router, experts, ab = m.groups()
        if proj:
            out[f"layers.{layer}.attention.{proj_of[proj]}.lora_{ab}"] = t
        elif router:
            out[f"layers.{layer}.moe.router.gate.lora_{ab}"] = t
        else:
            matrix = _expert_matrix(tensors, key, layer, experts, args)
            if t.shape[0 if ab == "A" else 1] % E:
                raise ConvertError(
                    f"adapter tensor {key!r} has shape {list(t.shape)}: not r x {E} experts; another model's?"
                )
            if ab == "A":  # [r*E, in] -> [E, in, r]
                t = t.reshape(E, t.shape[0] // E, t.shape[1]).permute(0, 2, 1)
            else:  # [out, r*E] -> [E, r, out]
                t = t.reshape(t.shape[0], t.shape[1] // E, E).permute(2, 1, 0)
            out[f"layers.{layer}.moe.experts.lora_{matrix}_{ab}"] = t
    return {k: v.contiguous() for k, v in out.items()}


def _layers_with_both(adapters: dict) -> set[str]:
    """Layers whose experts have adapters on both matrices (PEFT nests gate_up's there)."""
    seen: dict[str, set[str]] = {}
    for name in adapters:
        m = _OURS.match(name)
        if m and m.group(5):
            seen.setdefault(m.group(1), set()).add(m.group(5))
    return {layer for layer, matrices in seen.items() if len(matrices) == 2}


def _expert_matrix(tensors: dict, key: str, layer: str, module: str, args: ModelArgs) -> str:
    """gate_up or down, for a PEFT expert adapter key: nested ones are gate_up's; an outer one is
    down's when the layer also has a nested one, else told by its shapes (lora_B's output: 2I for
    gate_up, H for down; lora_A's input when those are equal)."""
    if module.endswith("base_layer"):
        return "gate_up"
    outer = f"{PREFIX}{layer}.mlp.experts"
    if f"{outer}.base_layer.lora_A.weight" in tensors:
        return "down"
    b, a = tensors.get(f"{outer}.lora_B.weight"), tensors.get(f"{outer}.lora_A.weight")
    H, two_i = args.dim, 2 * args.moe_inter_dim
    if b is not None and b.shape[0] in (H, two_i) and H != two_i:
        return "gate_up" if b.shape[0] == two_i else "down"
    if a is not None and a.shape[1] in (H, args.moe_inter_dim):
        return "gate_up" if a.shape[1] == H else "down"
    raise ConvertError(
        f"adapter tensor {key!r}: its shapes fit neither gate_up_proj nor down_proj of this model"
    )


def adapter_config(names, rank: int, alpha: float, n_layers: int, base: str | None) -> dict:
    """adapter_config.json for adapters with these parameter names (model state names): PEFT's
    short target names where a kind sits on every layer, else each place by its full name."""
    sites = sites_of(names)
    every = range(n_layers)
    attn = [s for s in sites if ".attention." in s]
    modules: list[str] = []
    if attn and len(attn) == 4 * n_layers:
        modules = list(ATTENTION.values())
    else:
        modules = [f"model.layers.{s.split('.')[1]}.self_attn.{ATTENTION[s.rsplit('.', 1)[1]]}" for s in attn]
    params = []
    for ours, hf in (("moe.experts.gate_up", "mlp.experts.gate_up_proj"), ("moe.experts.down", "mlp.experts.down_proj"),
                     ("moe.router.gate", "mlp.router.weight")):  # fmt: skip
        layers = [i for i in every if f"layers.{i}.{ours}" in sites]
        params += [hf] if len(layers) == n_layers else [f"model.layers.{i}.{hf}" for i in layers]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,  # PEFT refuses dropout on parameter targets; it acts in training only
        "target_modules": modules or None,
        "target_parameters": params or None,
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def lora_from_config(cfg: dict, args: ModelArgs) -> dict:
    """A [lora] section (rank, alpha, targets, layers) from an adapter_config.json (a ConvertError
    for what this model cannot hold: another method, DoRA, rsLoRA, bias adapters, other targets)."""
    if cfg.get("peft_type") != "LORA":
        raise ConvertError(
            f"adapter_config.json has peft_type {cfg.get('peft_type')!r}; only LORA adapters load"
        )
    for flag in ("use_dora", "use_rslora"):
        if cfg.get(flag):
            raise ConvertError(f"adapter_config.json sets {flag}; only plain LoRA adapters load")
    if cfg.get("bias", "none") != "none":
        raise ConvertError(f"adapter_config.json sets bias = {cfg['bias']!r}; only bias = 'none' loads")
    for field in ("rank_pattern", "alpha_pattern"):
        if cfg.get(field):
            raise ConvertError(
                f"adapter_config.json sets {field}; only one rank and alpha for every adapter load"
            )
    return {
        "rank": int(cfg["r"]),
        "alpha": float(cfg["lora_alpha"]),
        "dropout": float(cfg.get("lora_dropout") or 0.0),
    }
