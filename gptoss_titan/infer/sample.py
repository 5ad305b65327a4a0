"""Command-line generation from a training checkpoint or a Hugging Face folder, on 1 or N processes.

  python -m gptoss_titan.sample --checkpoint outputs/debug --prompt "In the beginning" --max_new_tokens 64
  python -m gptoss_titan.sample --hf hf/debug --prompt "Hi" --chat --temperature 0.8 --top_p 0.95
  NGPU=2 ./scripts/generate.sh --checkpoint outputs/debug --prompt "In the beginning"

With several processes (torchrun) the model is sharded with FSDP2 exactly as in training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from ..checkpoint import read_model_args, resolve_step_dir
from ..checkpoint.integrity import verify as verify_integrity
from ..checkpoint.lora_base import read_base_record
from ..config import JobConfig, model_args, parse_args
from ..data.tokenizer import get_tokenizer
from ..interop.convert import HFFolder, args_from_hf_config, load_hf_into
from ..model import FLAVORS, ModelArgs, Transformer
from ..model.args import TRAINING_ONLY_FIELDS
from ..model.local import local
from ..model.lora import LoRASpec, is_adapter
from ..model.tokens import STOP_IDS
from ..parallel.build import build_model, plan_run
from ..runtime.cli import exit_now, run_cli
from ..runtime.distributed import (
    check_torch_version,
    device_type,
    die_with_launcher,
    init_distributed,
    quiet_single_process_warnings,
    shutdown,
    world_size,
)
from ..runtime.dtypes import DTYPE_NAMES, dtype_of
from ..runtime.errors import UserError, write_reason
from .adapters import base_location, lora_checkpoint, peft_adapter
from .generate import generate


class SampleError(UserError):
    """A user-caused problem; printed as one line, exit 2."""


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="DCP step-<N> folder, or a run folder (latest complete step)")
    src.add_argument("--hf", help="Hugging Face gpt-oss folder (bf16/fp32 or MXFP4)")
    p.add_argument(
        "--config",
        help="training TOML (optional: the checkpoint carries its model args; given, its shape must match)",
    )
    src.add_argument("--flavor", help="a named model shape (20b, 120b, ...), with --plan only")
    p.add_argument(
        "--plan",
        action="store_true",
        help="print the memory one of NGPU ranks needs (weights, KV cache at the full context) and exit",
    )
    text = p.add_mutually_exclusive_group()
    text.add_argument("--prompt")
    text.add_argument("--prompt_file")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="in (0, 1]; 1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument(
        "--chat",
        action="store_true",
        help="render the prompt as a harmony conversation (openai-harmony); print the reply's analysis "
        "and final channels separately",
    )
    p.add_argument("--output_json", help="also write the generated token ids here")
    p.add_argument(
        "--adapter", help="a PEFT LoRA adapter folder (ours or peft's) applied unmerged on the weights"
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default=None,
        help="weights and compute dtype (default: bfloat16 on GPUs, float32 on CPUs)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (one process): a one-time compile, then a faster step",
    )
    a = p.parse_args(argv)
    a.dtype = a.dtype or default_dtype()
    return a


def default_dtype() -> str:
    """bf16 on GPUs (the released weights' dtype); fp32 on CPUs (bf16 matmuls are slow on many)."""
    return "bfloat16" if device_type() == "cuda" else "float32"


def rank_model(
    args: ModelArgs, dtype: str, batch: int, world: int, device: torch.device, lora: LoRASpec | None = None
) -> Transformer:
    """The model this rank holds (parallel/build.py, as in training) with weights in `dtype`, its
    expert kernel chosen for `batch` sequences per decode step, sharded over the world with the
    training defaults (FSDP2 over every rank) when there are several; buffers set, weights empty
    (device meta: shapes only)."""
    cfg = JobConfig()
    cfg.training.mixed_precision_param = dtype  # parameters are stored and gathered in this dtype
    cfg.training.local_batch_size, cfg.training.seq_len = batch, 1  # one decode step's routed rows
    plan = plan_run(cfg, world, args)
    meshes = plan.dims.build_meshes(device_type()) if world > 1 else None
    # lora: adapters beside the weights, unmerged (model/lora.py)
    return build_model(cfg, plan, meshes, device, init=False, weights_dtype=dtype_of(dtype), lora=lora).model


def check_config_shape(config: str | None, args: ModelArgs) -> None:
    """--config: the training config's model shape must be the weights' (one line naming the field)."""
    if not config:
        return
    want = model_args(parse_args(["--config", config])).to_dict()
    have = args.to_dict()
    for k, v in want.items():  # training choices that do not change the weights' shapes or use
        if (
            k not in ("init_std", "load_balance_bias", "max_seq_len", *TRAINING_ONLY_FIELDS)
            and have.get(k) != v
        ):
            raise SampleError(
                f"--config {config!r} gives model {k} = {v!r} but the weights have {have.get(k)!r}; "
                "pass the config they were trained with, or leave --config out"
            )


def load_model(a: argparse.Namespace) -> Transformer:
    """The model on this rank, every rank reading only its own part of the weights (DCP shards, or
    the rows of each safetensors tensor it holds), in --dtype."""
    if a.hf:
        folder = HFFolder(a.hf)
        args = args_from_hf_config(folder.config)
    else:
        step = resolve_step_dir(a.checkpoint)
        args = read_model_args(step)
        damage = verify_integrity(step)
        if damage:
            raise SampleError(f"checkpoint {str(step)!r} is damaged ({damage}); pass another step")
    check_config_shape(a.config, args)
    lora, adapters, hf = None, {}, a.hf
    if not hf and read_base_record(step) is not None:  # a LoRA run's checkpoint: its base, then it
        if a.adapter:
            raise SampleError(
                f"--adapter with the LoRA checkpoint {str(step)!r}, which has its own adapters: pass its base instead"
            )
        lora, adapters = lora_checkpoint(step)
        hf, step = base_location(step)
        folder = HFFolder(hf) if hf else None
    if a.adapter:
        lora, adapters = peft_adapter(a.adapter, args)
    model = rank_model(args, a.dtype, a.num_samples, world_size(), torch.device(device_type()), lora)
    if hf:
        load_hf_into(model, folder, args)
    else:
        state = {"model": {k: v for k, v in get_model_state_dict(model).items() if not is_adapter(k)}}
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(step)), no_dist=world_size() == 1)
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    if adapters:
        dtype = dtype_of(a.dtype)
        full = {k: v.to(dtype) for k, v in adapters.items()}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
    return model.eval()


def memory_plan(args: ModelArgs, world: int, dtype: str, batch: int, context: int) -> dict[str, float]:
    """Bytes one rank holds to sample from `args` on `world` processes, counted on the meta device
    with the real sharding (a fake process group, so no GPU is needed): the weights (this rank's
    shard), the largest FSDP unit gathered at once, and the KV cache for `batch` sequences of
    `context` tokens (every rank holds the whole cache). GiB."""
    from ..runtime.compat import fake_process_group

    if world > 1:
        fake_process_group(world)
    try:
        model = rank_model(args, dtype, batch, world, torch.device("meta"))
        size = dtype_of(dtype).itemsize
        held = {n: local(p).numel() for n, p in model.named_parameters()}
        units = [m for m in model.modules() if hasattr(m, "unshard")] or [model]
        largest = max(
            sum(p.numel() for p in u.parameters()) for u in units[1:] or units
        )  # blocks, not the root
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    kv = sum(
        2
        * batch
        * args.n_kv_heads
        * args.head_dim
        * size
        * (min(args.sliding_window, context) if args.is_sliding(i) else context)
        for i in range(args.n_layers)
    )
    gib = 2**30
    weights = sum(held.values()) * size / gib
    gathered = largest * size / gib if world > 1 else 0.0
    return {
        "weights_gib": weights,
        "largest_gather_gib": gathered,
        "kv_cache_gib": kv / gib,
        "total_gib": weights + gathered + kv / gib,
    }


def check(a: argparse.Namespace) -> None:
    if a.flavor:
        raise SampleError(
            "--flavor describes a shape without weights: use it with --plan, or pass --checkpoint/--hf"
        )
    if a.prompt is None and a.prompt_file is None:
        raise SampleError("pass --prompt TEXT or --prompt_file FILE")
    if a.temperature < 0:
        raise SampleError(f"--temperature {a.temperature} must be >= 0 (0 = greedy)")
    if not 0 < a.top_p <= 1:
        raise SampleError(f"--top_p {a.top_p} must be in (0, 1]")
    if a.max_new_tokens < 1 or a.num_samples < 1 or a.top_k < 0:
        raise SampleError("--max_new_tokens and --num_samples must be >= 1, --top_k >= 0")
    if a.output_json:  # checked before the model loads and generates, not after
        folder = Path(a.output_json).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK) or Path(a.output_json).is_dir():
            raise SampleError(
                f"--output_json {a.output_json!r} cannot be written (its folder is missing, read-only, or "
                "it is a folder); choose another path"
            )


def prompt_ids(a: argparse.Namespace) -> list[int]:
    if a.prompt_file:
        if not Path(a.prompt_file).is_file():
            raise SampleError(f"--prompt_file {a.prompt_file!r} does not exist")
        raw = Path(a.prompt_file).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SampleError(
                f"--prompt_file {a.prompt_file!r} is not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 4]!r}); "
                "save it as UTF-8"
            ) from None
    else:
        text = a.prompt
    if not text:
        raise SampleError("the prompt is empty; pass --prompt TEXT or a non-empty --prompt_file")
    if a.chat:  # harmony: system message, the user's, then <|start|>assistant
        from ..data.chat import prompt

        return prompt({"messages": [{"role": "user", "content": text}]})
    return get_tokenizer().encode_ordinary(text)


def chat_reply(tokens: list[int]) -> str:
    """A generated assistant reply parsed by harmony: each message's channel and text; the raw text
    when it does not parse (an undertrained model)."""
    from openai_harmony import HarmonyError, Role

    from ..data.chat import harmony

    try:
        msgs = harmony().parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
    except HarmonyError as e:
        return f"[not a harmony reply: {e}]\n{get_tokenizer().decode(tokens)}"
    lines = []
    for m in msgs:
        text = "".join(c.text for c in m.content if hasattr(c, "text"))
        to = f" to {m.recipient}" if m.recipient else ""
        lines.append(f"[{m.channel or 'no channel'}{to}] {text}")
    return "\n".join(lines)


def plan(a: argparse.Namespace) -> None:
    """--plan: the memory of one rank of WORLD_SIZE (scripts/generate.sh sets it from NGPU)."""
    if a.flavor:
        if a.flavor not in FLAVORS:
            raise SampleError(f"--flavor {a.flavor!r} is not one of {', '.join(FLAVORS)}")
        args = FLAVORS[a.flavor]
    else:
        args = (
            args_from_hf_config(HFFolder(a.hf).config)
            if a.hf
            else read_model_args(resolve_step_dir(a.checkpoint))
        )
    world = world_size()
    p = memory_plan(args, world, a.dtype, a.num_samples, args.max_seq_len)
    print(
        f"sampling plan: {args.num_params():,} parameters in {a.dtype} on {world} rank(s), {a.num_samples} "
        f"sequence(s) of up to {args.max_seq_len} tokens; per rank: weights {p['weights_gib']:.2f} GiB + "
        f"largest FSDP unit gathered {p['largest_gather_gib']:.2f} GiB + KV cache {p['kv_cache_gib']:.2f} GiB "
        f"= {p['total_gib']:.2f} GiB"
    )


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    code = run_cli(_check_process)
    if code:
        return code
    quiet_single_process_warnings()
    if a.plan:
        return run_cli(lambda: plan(a))
    rank, _ = init_distributed()
    code = run_cli(lambda: sample(a, rank), show=rank == 0)  # every rank fails alike: rank 0 says it
    if code == 0:
        shutdown()
    return code


def _check_process() -> None:
    check_torch_version()
    die_with_launcher()


def sample(a: argparse.Namespace, rank: int) -> None:
    """Load the model, generate, print (rank 0) and write --output_json."""
    check(a)
    ids = prompt_ids(a)
    model = load_model(a)
    limit = model.args.max_seq_len
    if max(ids) >= model.args.vocab_size:
        raise SampleError(
            f"the prompt has token id {max(ids)}, beyond the model's vocab_size {model.args.vocab_size} "
            "(it was trained on a smaller vocabulary); use a prompt of ids below it"
        )
    if len(ids) + a.max_new_tokens > limit:
        raise SampleError(
            f"prompt ({len(ids)} tokens) + --max_new_tokens {a.max_new_tokens} exceeds the "
            f"model's context of {limit} tokens; shorten the prompt or ask for fewer tokens"
        )
    enc = get_tokenizer()
    stops = STOP_IDS
    device = model.rope_cos.device
    prompt = torch.tensor([ids] * a.num_samples, device=device)
    stream = a.num_samples == 1 and rank == 0 and not a.chat  # chat replies are parsed at the end
    shown: list[int] = []
    printed = [0]

    def show(nxt: torch.Tensor) -> None:  # print the new text as soon as it decodes cleanly
        if stream and int(nxt[0]) not in stops:
            shown.append(int(nxt[0]))
            text = enc.decode(shown)
            if not text.endswith("\ufffd"):
                print(text[printed[0] :], end="", flush=True)
                printed[0] = len(text)

    out = generate(
        model,
        prompt,
        a.max_new_tokens,
        a.temperature,
        a.top_k,
        a.top_p,
        a.seed,
        stops,
        on_token=show,
        compile=a.compile,
    )
    if rank == 0:
        if stream:
            print()
        new = [out[i, len(ids) :].tolist() for i in range(a.num_samples)]
        if not stream:
            for i, toks in enumerate(new):
                text = chat_reply(toks) if a.chat else enc.decode([t for t in toks if t not in stops])
                print(f"--- sample {i}\n{text}")
        if a.output_json:
            write_json(Path(a.output_json), {"prompt": ids, "tokens": new})


def write_json(path: Path, value: dict) -> None:
    """Whole or not at all: a temporary file beside it, renamed into place; a failed write is one line."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(value) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SampleError(
            f"--output_json {str(path)!r} could not be written ({write_reason(e, path.parent)})"
        ) from None


if __name__ == "__main__":
    exit_now(main())
