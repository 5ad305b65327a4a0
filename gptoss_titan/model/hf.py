"""Native <-> Hugging Face gpt-oss: one declarative name table, config.json (MXFP4: mxfp4.py).

Native expert tensors already use Hugging Face's [in, out] layout with interleaved gate/up, so
every mapping is a rename plus a shape check; there is no string surgery outside the table.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from ..runtime.errors import UserError
from .args import ModelArgs
from .tokens import CALL_ID, EOT_ID, RETURN_ID, STARTOFTEXT_ID, STOP_IDS

# (native name, Hugging Face name); "{L}" stands for the layer index.
NAME_TABLE: tuple[tuple[str, str], ...] = (
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("layers.{L}.attention_norm.weight", "model.layers.{L}.input_layernorm.weight"),
    ("layers.{L}.ffn_norm.weight", "model.layers.{L}.post_attention_layernorm.weight"),
    ("layers.{L}.attention.wq.weight", "model.layers.{L}.self_attn.q_proj.weight"),
    ("layers.{L}.attention.wq.bias", "model.layers.{L}.self_attn.q_proj.bias"),
    ("layers.{L}.attention.wk.weight", "model.layers.{L}.self_attn.k_proj.weight"),
    ("layers.{L}.attention.wk.bias", "model.layers.{L}.self_attn.k_proj.bias"),
    ("layers.{L}.attention.wv.weight", "model.layers.{L}.self_attn.v_proj.weight"),
    ("layers.{L}.attention.wv.bias", "model.layers.{L}.self_attn.v_proj.bias"),
    ("layers.{L}.attention.wo.weight", "model.layers.{L}.self_attn.o_proj.weight"),
    ("layers.{L}.attention.wo.bias", "model.layers.{L}.self_attn.o_proj.bias"),
    ("layers.{L}.attention.sinks", "model.layers.{L}.self_attn.sinks"),
    ("layers.{L}.moe.router.gate.weight", "model.layers.{L}.mlp.router.weight"),
    ("layers.{L}.moe.router.gate.bias", "model.layers.{L}.mlp.router.bias"),
    ("layers.{L}.moe.experts.w_gate_up", "model.layers.{L}.mlp.experts.gate_up_proj"),
    ("layers.{L}.moe.experts.b_gate_up", "model.layers.{L}.mlp.experts.gate_up_proj_bias"),
    ("layers.{L}.moe.experts.w_down", "model.layers.{L}.mlp.experts.down_proj"),
    ("layers.{L}.moe.experts.b_down", "model.layers.{L}.mlp.experts.down_proj_bias"),
)

# Native-only state that Hugging Face does not have (dropped on export, absent on import).
NATIVE_ONLY = ("layers.{L}.moe.router.expert_bias",)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Native name (with {L}) -> shape."""
    H, V, E, I = args.dim, args.vocab_size, args.num_experts, args.moe_inter_dim
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    return {
        "tok_embeddings.weight": (V, H),
        "norm.weight": (H,),
        "output.weight": (V, H),
        "layers.{L}.attention_norm.weight": (H,),
        "layers.{L}.ffn_norm.weight": (H,),
        "layers.{L}.attention.wq.weight": (q, H),
        "layers.{L}.attention.wq.bias": (q,),
        "layers.{L}.attention.wk.weight": (kv, H),
        "layers.{L}.attention.wk.bias": (kv,),
        "layers.{L}.attention.wv.weight": (kv, H),
        "layers.{L}.attention.wv.bias": (kv,),
        "layers.{L}.attention.wo.weight": (H, q),
        "layers.{L}.attention.wo.bias": (H,),
        "layers.{L}.attention.sinks": (args.n_heads,),
        "layers.{L}.moe.router.gate.weight": (E, H),
        "layers.{L}.moe.router.gate.bias": (E,),
        "layers.{L}.moe.experts.w_gate_up": (E, H, 2 * I),
        "layers.{L}.moe.experts.b_gate_up": (E, 2 * I),
        "layers.{L}.moe.experts.w_down": (E, I, H),
        "layers.{L}.moe.experts.b_down": (E, H),
    }


def name_pairs(args: ModelArgs) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """Every (native name, HF name, shape) of a model with these args, in a stable order."""
    shapes = expected_shapes(args)
    for native, hf in NAME_TABLE:
        layers = range(args.n_layers) if "{L}" in native else [None]
        for i in layers:
            idx = "" if i is None else str(i)
            yield native.replace("{L}", idx), hf.replace("{L}", idx), shapes[native]


class MappingError(UserError):
    """A state dict does not match the model args (missing key, extra key or wrong shape)."""


def is_native_only(name: str) -> bool:
    """A native state name Hugging Face checkpoints do not have (the balancing biases)."""
    return any(re.fullmatch(p.replace(".", r"\.").replace("{L}", r"\d+"), name) for p in NATIVE_ONLY)


def _convert(sd: dict[str, torch.Tensor], args: ModelArgs, to_hf_side: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen = set()
    for native, hf, shape in name_pairs(args):
        src, dst = (native, hf) if to_hf_side else (hf, native)
        if src not in sd:
            raise MappingError(f"tensor {src!r} is missing (expected shape {list(shape)})")
        t = sd[src]
        if tuple(t.shape) != shape:
            raise MappingError(f"tensor {src!r} has shape {list(t.shape)}, expected {list(shape)}")
        out[dst] = t
        seen.add(src)
    extra = [k for k in sd if k not in seen and not (to_hf_side and is_native_only(k))]
    if extra:
        raise MappingError(
            f"unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all) for these model args"
        )
    return out


def to_hf(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Native state dict -> Hugging Face names (shapes checked; native-only buffers dropped)."""
    return _convert(state_dict, args, to_hf_side=True)


def from_hf(hf_state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Hugging Face state dict (dequantized) -> native names (shapes checked)."""
    return _convert(hf_state_dict, args, to_hf_side=False)


def hf_config(args: ModelArgs, dtype: str = "bfloat16") -> dict:
    """config.json for transformers' GptOssConfig (both the 4.x and 5.x field spellings)."""
    rope = {
        "rope_type": "yarn",
        "factor": args.rope_factor,
        "beta_fast": args.rope_beta_fast,
        "beta_slow": args.rope_beta_slow,
        "original_max_position_embeddings": args.rope_original_seq_len,
        "truncate": False,  # must be explicit: a missing key means True and shifts the frequencies
    }
    eos, pad = RETURN_ID, EOT_ID
    if args.vocab_size <= eos:  # small flavors: keep special ids inside the vocabulary
        eos, pad = args.vocab_size - 1, args.vocab_size - 2
    return {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.moe_inter_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "num_local_experts": args.num_experts,
        "num_experts_per_tok": args.top_k,
        "experts_per_token": args.top_k,
        "sliding_window": args.sliding_window,
        "layer_types": [
            "sliding_attention" if args.is_sliding(i) else "full_attention" for i in range(args.n_layers)
        ],
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": dict(rope),
        "rope_parameters": {**rope, "rope_theta": args.rope_theta},
        "swiglu_limit": args.swiglu_limit,
        "swiglu_alpha": args.swiglu_alpha,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "initializer_range": args.init_std,
        "router_aux_loss_coef": 0.9,
        "output_router_logits": False,
        "use_cache": True,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def generation_config(args: ModelArgs) -> dict:
    """generation_config.json: stop at <|return|>, <|endoftext|> or <|call|> (as the release does)."""
    cfg = hf_config(args)
    eos = list(STOP_IDS) if args.vocab_size > CALL_ID else [cfg["eos_token_id"]]
    return {
        "bos_token_id": STARTOFTEXT_ID if args.vocab_size > STARTOFTEXT_ID else cfg["pad_token_id"],
        "eos_token_id": eos,
        "pad_token_id": cfg["pad_token_id"],
        "do_sample": False,
    }
