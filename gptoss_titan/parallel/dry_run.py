"""Dry run at scale on a fake process group: real meshes, every pass, no training.

  COMM_MODE=fake_backend NGPU=64 CONFIG_FILE=train_configs/gpt_oss_120b.toml ./scripts/run_train.sh \
      --parallelism.expert_parallel_degree=8

One process pretends to be rank 0 of NGPU. The model stays on the meta device, so nothing is
allocated; the printout is what each rank would hold: parameters (fp32 master weights),
gradients and AdamW state (a LoRA run: the frozen base in its storage dtype, the adapters with
their gradients and AdamW), dense vs experts, the largest FSDP all-gather, and an estimate of the
activations of one micro-batch (local_batch_size x seq_len / context_parallel_degree tokens).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from ..config import JobConfig, lora_base_dtype, model_name
from ..model.local import local
from ..model.lora import is_adapter
from ..model.loss import ACCEL_CHUNK_ELEMS, CPU_CHUNK_ELEMS
from ..model.mxfp4 import CHUNK_ELEMS
from ..runtime.compat import fake_process_group, fsdp_mesh_size
from ..runtime.dtypes import dtype_of
from .activation_checkpoint import unwrap
from .build import RunPlan, build_model, plan_run

GIB = 2**30


def _fsdp_groups(model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(module name, FSDP mesh size, local param elements) for every FSDP module's own params."""
    owner: dict[int, tuple[str, int]] = {}
    for name, m in model.named_modules():
        mesh_size = fsdp_mesh_size(m) if isinstance(m, FSDPModule) else None
        if mesh_size is not None:
            for p in m.parameters():
                owner[id(p)] = (name or "<root>", mesh_size)  # inner modules come later and win
    sizes: dict[tuple[str, int], int] = {}
    for p in model.parameters():
        key = owner[id(p)]
        sizes[key] = sizes.get(key, 0) + local(p).numel()
    return [(name, mesh, n) for (name, mesh), n in sizes.items()]


def activation_bytes(
    args, tokens: int, ac, compute_bytes: int, accel: bool = True, tp: int = 1
) -> dict[str, float]:
    """Estimated bytes a rank keeps for backward for `tokens` tokens: what autograd saves in this
    model, counted per op and checked against saved-tensor hooks on CPU (the debug flavor in
    fp32: 8.2 KB estimated vs 8.6 KB measured per token and layer; kernels' scratch not included).
    Per token and layer without checkpointing: 16 H (the two RMSNorms' fp32 copies)
    + b (2 H + 3 N D + 2 G D + K (H + 3 I) + 2 K H) (normed inputs of attention and router; q, k,
    v, the attention output and the o-projection input; per routed row the expert input, gate-up
    output and activation; the dispatched and combined rows; b = compute bytes) + 4 E (router).
    A checkpointed block keeps only its input (b H) and recomputes one block at a time; per-op
    checkpointing drops the norms' copies of the attention half. The loss keeps an fp32 gradient
    of the last hidden states and one chunk of logits (loss.py).
    With tensor parallelism (tokens: the rank's whole sequences) the norms and block inputs hold
    1/tp of the tokens, the heads and expert columns 1/tp, the gathered inputs of attention and the
    MoE and the routed rows all tokens, the loss 1/tp of the vocabulary."""
    H, N, D, G = args.dim, args.n_heads, args.head_dim, args.n_kv_heads
    K, Inter, E, L = args.top_k, args.moe_inter_dim, args.num_experts, args.n_layers
    heads = (3 * N * D + 2 * G * D) / tp
    layer = 16 * H / tp + compute_bytes * (2 * H + heads + K * (H + 3 * Inter / tp) + 2 * K * H) + 4 * E
    boundary = compute_bytes * H / tp
    if ac.mode == "full" or (ac.mode == "selective" and ac.selective_ac_option != "op"):
        every = 1 if ac.mode == "full" else int(ac.selective_ac_option)
        n_ckpt = math.ceil(L / every)
        blocks = n_ckpt * boundary + (L - n_ckpt) * layer + layer  # + the block being recomputed
    elif ac.mode == "selective":  # per-op
        blocks = L * (layer - 8 * H)
    else:
        blocks = L * layer
    vocab = args.vocab_size // tp
    chunk = min(tokens, max(1, (ACCEL_CHUNK_ELEMS if accel else CPU_CHUNK_ELEMS) // vocab))
    # + the chunk's gradient in the compute dtype on accelerators (cast for the two GEMMs)
    loss = 4 * H * tokens + (4 + (compute_bytes if accel and compute_bytes < 4 else 0)) * chunk * vocab
    return {"blocks": blocks * tokens, "loss": loss}


def _rank_plan(cfg: JobConfig, plan: RunPlan, meshes, pp_rank: int, accel: bool = True) -> dict:
    """What one rank of pipeline rank pp_rank holds (every rank when pp = 1): its stages built on
    the meta device with every pass; parameter elements (dense, experts), FSDP groups, activations."""
    args, dims, micro_batches = plan.args, plan.dims, plan.accum_steps
    stages = build_model(cfg, plan, meshes, torch.device("meta"), pp_rank=pp_rank).stages
    t = cfg.training
    pbytes = dtype_of(t.mixed_precision_param).itemsize
    out = {"dense": 0, "experts": 0, "adapters": 0, "groups": [], "blocks": 0.0, "loss": 0.0, "layers": 0}
    out |= {"dense_bytes": 0, "experts_bytes": 0, "dequantized": 0}  # as stored; one layer's MXFP4 experts
    tokens = t.local_batch_size * t.seq_len // dims.cp
    for _, part in stages:
        for n, p in part.named_parameters():
            kind = "adapters" if is_adapter(n) else "experts" if ".moe.experts." in n else "dense"
            out[kind] += local(p).numel()
            if kind != "adapters":
                out[f"{kind}_bytes"] += local(p).numel() * p.element_size()
        for block in part.blocks()[:1]:
            if unwrap(block).moe.experts.mxfp4_base:  # one matrix of the layer at a time (model/mxfp4.py),
                # as FSDP gathers it: this rank's experts (ep) and columns (tp), whatever FSDP's split
                a = plan.args
                cols = dims.tp if dims.moe_split else 1
                largest = (a.num_experts // dims.ep) * a.dim * 2 * a.moe_inter_dim // cols  # gate-up values
                out["dequantized"] = largest * pbytes + min(largest, CHUNK_ELEMS) * (pbytes + 2)
        out["groups"] += _fsdp_groups(part)
        n_layers = len(part.blocks())
        out["layers"] += n_layers
        if n_layers:
            # 1F1B-style schedules keep up to pp - rank micro-batches in flight on a rank, GPipe all
            gpipe = cfg.parallelism.pipeline_parallel_schedule == "GPipe"
            in_flight = micro_batches if gpipe or dims.pp == 1 else min(micro_batches, dims.pp - pp_rank)
            a = dataclasses.replace(args, n_layers=n_layers)
            act = activation_bytes(a, tokens, cfg.activation_checkpoint, pbytes, accel, tp=dims.tp)
            out["blocks"] += act["blocks"] * (in_flight if dims.pp > 1 else 1)
        if part.output is not None:
            out["loss"] = activation_bytes(
                args, tokens, cfg.activation_checkpoint, pbytes, accel, tp=dims.tp
            )["loss"]
    out["rollout"] = _rollout_bytes(cfg, plan, out["groups"])
    return out


def _rollout_bytes(cfg: JobConfig, plan: RunPlan, groups: list[tuple[str, int, int]]) -> dict[str, float]:
    """What an RL rank holds on top while it samples (empty without rl.enable): the KV cache of its
    largest decode batch (rl.generation_batch rows at most, whole groups; every sequence up to
    training.seq_len tokens, sliding layers a window's worth; K and V in the compute dtype) and,
    with rl.gather_weights, the unsharded copy of every sharded FSDP group's weights."""
    rl, t, a, dims = cfg.rl, cfg.training, plan.args, plan.dims
    if not rl.enable:
        return {}
    cbytes = dtype_of(t.mixed_precision_param).itemsize
    prompts = max(rl.prompts_per_step // dims.dp_degree, 1)
    rows = min(max(rl.generation_batch // rl.group_size, 1), prompts) * rl.group_size
    slots = sum(min(a.sliding_window, t.seq_len) if a.is_sliding(i) else t.seq_len for i in range(a.n_layers))
    out = {"rollout KV cache": rows * slots * 2 * (a.n_kv_heads // dims.tp) * a.head_dim * cbytes}
    if rl.gather_weights:
        out["rollout weights gathered"] = sum(n * mesh * cbytes for _, mesh, n in groups if mesh > 1)
    return out


def _state_rows(cfg: JobConfig) -> list[tuple[str, int, str]]:
    """(label, bytes per element (0: as stored), which elements) of what a rank holds besides
    activations: fp32 weights, gradients and AdamW for full training; a LoRA run's frozen base as
    stored (its dtype; MXFP4 experts in their uint8 blocks and scales; no gradient, no optimizer
    state) and its adapters' fp32 weights, gradients and AdamW."""
    if not cfg.lora.rank:
        reference = cfg.rl.enable and (cfg.rl.kl_coef > 0 or cfg.rl.log_kl)  # RL's frozen copy (full FT)
        return [
            ("parameters (fp32)", 4, "model"),
            ("gradients (fp32)", 4, "model"),
            ("AdamW state (2 x fp32)", 8, "model"),
        ] + ([("RL KL reference (fp32)", 4, "model")] if reference else [])
    base = lora_base_dtype(cfg)
    if cfg.lora.base_format == "mxfp4":  # (the label fits the table's first column)
        base = "MXFP4+" + {"bfloat16": "bf16", "float32": "fp32"}.get(base, base)
    return [
        (f"frozen base ({base})", 0, "model"),
        ("adapters (fp32)", 4, "adapters"),
        ("adapter gradients (fp32)", 4, "adapters"),
        ("adapter AdamW (2 x fp32)", 8, "adapters"),
    ]


def _row_bytes(plan: dict, b: int, which: str) -> tuple[float, float]:
    """(dense, experts) bytes of one row of _state_rows."""
    if which == "adapters":
        return b * plan["adapters"], 0.0
    if b == 0:
        return plan["dense_bytes"], plan["experts_bytes"]
    return b * plan["dense"], b * plan["experts"]


def _total_gib(plan: dict, rows: list[tuple[str, int, str]]) -> float:
    held = sum(sum(_row_bytes(plan, b, which)) for _, b, which in rows)
    return (held + plan["blocks"] + plan["loss"] + plan["dequantized"] + sum(plan["rollout"].values())) / GIB


def _plans(cfg: JobConfig, world_size: int, accel: bool) -> tuple[RunPlan, list[dict], list]:
    """(the run's plan, what each pipeline rank holds, the state rows) on a fake process group
    of world_size ranks (left initialized)."""
    plan = plan_run(cfg, world_size)
    fake_process_group(world_size)
    meshes = plan.dims.build_meshes("cpu")
    plans = [_rank_plan(cfg, plan, meshes, p, accel) for p in range(plan.dims.pp)]
    return plan, plans, _state_rows(cfg)


def planned_gib(cfg: JobConfig, world_size: int, accel: bool = True) -> float:
    """The dry run's sum for the most loaded rank, in GiB (accel False: the CPU loss chunks, to
    compare with a measured CPU run: benchmarks/lora_memory.py)."""
    _, plans, rows = _plans(cfg, world_size, accel)
    dist.destroy_process_group()
    return max(_total_gib(p, rows) for p in plans)


def dry_run(cfg: JobConfig, world_size: int) -> None:
    plan, plans, rows = _plans(cfg, world_size, accel=True)
    args, dims, micro_batches = plan.args, plan.dims, plan.accum_steps
    t = cfg.training
    worst = max(range(dims.pp), key=lambda p: _total_gib(plans[p], rows))
    held = plans[worst]
    pbytes = dtype_of(t.mixed_precision_param).itemsize
    name, mesh, n = max(held["groups"], key=lambda g: g[2] * g[1])
    lora = (
        f", LoRA rank {cfg.lora.rank} ({held['adapters']:,} adapter elements on this rank)"
        if cfg.lora.rank
        else ""
    )
    print(
        f"dry run: {model_name(cfg)} ({args.num_params():,} parameters{lora}) on {world_size} ranks: pp {dims.pp} x "
        f"replicate {dims.dp_replicate} x shard {dims.dp_shard} x cp {dims.cp} x tp {dims.tp} "
        f"(efsdp {dims.efsdp} x ep {dims.ep})"
    )
    if dims.pp > 1:
        per_stage = ", ".join(f"{_total_gib(q, rows):.1f} GiB ({q['layers']} layers)" for q in plans)
        print(
            f"pipeline ranks (schedule {cfg.parallelism.pipeline_parallel_schedule}, {micro_batches} micro-batches): "
            f"{per_stage}; the table is pipeline rank {worst}'s"
        )
    print(f"{'per rank':<26}{'dense GiB':>12}{'experts GiB':>14}{'total GiB':>12}")
    total = 0.0
    for label, b, which in rows:
        d, e = (x / GIB for x in _row_bytes(held, b, which))
        if which == "model":
            print(f"{label:<26}{d:>12.3f}{e:>14.3f}{d + e:>12.3f}")
        else:
            print(f"{label:<26}{'':>12}{'':>14}{d:>12.3f}")
        total += d + e
    tokens = t.local_batch_size * t.seq_len // dims.cp
    ac = cfg.activation_checkpoint.mode + (
        f" {cfg.activation_checkpoint.selective_ac_option}"
        if cfg.activation_checkpoint.mode == "selective"
        else ""
    )
    print(f"{'activations (estimate)':<26}{'':>12}{'':>14}{held['blocks'] / GIB:>12.3f}")
    print(f"{'loss (fused, chunked)':<26}{'':>12}{'':>14}{held['loss'] / GIB:>12.3f}")
    if held["dequantized"]:
        print(f"{'MXFP4 experts dequantized':<26}{'':>12}{'':>14}{held['dequantized'] / GIB:>12.3f}")
    for label, b in held["rollout"].items():
        print(f"{label:<26}{'':>12}{'':>14}{b / GIB:>12.3f}")
    total += (held["blocks"] + held["loss"] + held["dequantized"] + sum(held["rollout"].values())) / GIB
    print(f"{'sum':<26}{'':>12}{'':>14}{total:>12.3f}")
    print(
        f"activations for {tokens:,} tokens per rank (local_batch_size {t.local_batch_size} x seq_len {t.seq_len:,}"
        f"{f' / cp {dims.cp}' if dims.cp > 1 else ''}{f', sequence-parallel over tp {dims.tp}' if dims.tp > 1 else ''}"
        f"{', micro-batches in flight per pipeline schedule' if dims.pp > 1 else ''}), activation checkpointing {ac}"
    )
    print(
        f"largest all-gather: {name} over {mesh} ranks, {n * mesh * pbytes / GIB:.3f} GiB "
        f"({t.mixed_precision_param}); FSDP groups: {len(held['groups'])}"
    )
    dist.destroy_process_group()
