"""Command-line generation from a training checkpoint or a Hugging Face folder, on 1 or N processes.

  python -m gptoss_titan.sample --checkpoint outputs/debug --prompt "In the beginning" --max_new_tokens 64
  python -m gptoss_titan.sample --hf hf/debug --prompt "Hi" --chat --temperature 0.8 --top_p 0.95
  NGPU=2 ./scripts/generate.sh --checkpoint outputs/debug --prompt "In the beginning"

With several processes (torchrun) the model is sharded with FSDP2 exactly as in training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .checkpoint import read_model_args, resolve_step_dir
from .config import JobConfig
from .convert import HFFolder, args_from_hf_config
from .data.tokenizer import get_tokenizer
from .distributed import device_type, init_distributed, quiet_single_process_warnings, shutdown, world_size
from .errors import UserError
from .generate import generate
from .model import Transformer
from .model.hf import from_hf, name_pairs
from .model.moe import resolve_expert_kernel
from .parallel import ParallelDims, parallelize
from .tokens import CHAT_SPECIALS, STOP_IDS, chat_prompt


class SampleError(UserError):
    """A user-caused problem; printed as one line, exit 2."""


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="DCP step-<N> folder, or a run folder (latest complete step)")
    src.add_argument("--hf", help="Hugging Face gpt-oss folder (bf16/fp32 or MXFP4)")
    p.add_argument("--config", help="training TOML (optional: the checkpoint carries its model args)")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt")
    text.add_argument("--prompt_file")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="in (0, 1]; 1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the harmony chat format")
    p.add_argument("--output_json", help="also write the generated token ids here")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (one process): a one-time compile, then a faster step",
    )
    return p.parse_args(argv)


def load_model(a: argparse.Namespace) -> Transformer:
    """The model on this rank: whole on one process; over several, sharded by `parallelize()` with
    the training defaults (FSDP2 over every rank, as a training run on that many processes)."""
    if a.hf:
        folder = HFFolder(a.hf)
        args = args_from_hf_config(folder.config)
    else:
        step = resolve_step_dir(a.checkpoint)
        args = read_model_args(step)
    with torch.device("meta"):
        model = Transformer(args)
    kernel, _ = resolve_expert_kernel(
        "auto", device_type(), torch.float32, args.num_experts, a.num_samples * args.top_k
    )
    model.set_expert_kernel(kernel)
    world = world_size()
    if world > 1:
        cfg = JobConfig()
        dims = ParallelDims.from_config(cfg.parallelism, world, args.num_experts)
        parallelize(model, dims, dims.build_meshes(device_type()), cfg)
    model.to_empty(device=device_type())
    model.init_buffers()
    if a.hf:
        sd = from_hf({hf: folder.load(hf).float() for _, hf, _ in name_pairs(args)}, args)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(
            model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        )
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        state = {"model": get_model_state_dict(model)}
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(step)), no_dist=world == 1)
        set_model_state_dict(model, state["model"])
    return model.eval()


def check(a: argparse.Namespace) -> None:
    if a.temperature < 0:
        raise SampleError(f"--temperature {a.temperature} must be >= 0 (0 = greedy)")
    if not 0 < a.top_p <= 1:
        raise SampleError(f"--top_p {a.top_p} must be in (0, 1]")
    if a.max_new_tokens < 1 or a.num_samples < 1 or a.top_k < 0:
        raise SampleError("--max_new_tokens and --num_samples must be >= 1, --top_k >= 0")


def prompt_ids(a: argparse.Namespace) -> list[int]:
    if a.prompt_file:
        if not Path(a.prompt_file).is_file():
            raise SampleError(f"--prompt_file {a.prompt_file!r} does not exist")
        text = Path(a.prompt_file).read_text()
    else:
        text = a.prompt
    if not text:
        raise SampleError("the prompt is empty; pass --prompt TEXT or a non-empty --prompt_file")
    enc = get_tokenizer()
    if a.chat:
        return enc.encode(chat_prompt(text), allowed_special=CHAT_SPECIALS)
    return enc.encode_ordinary(text)


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    quiet_single_process_warnings()
    rank, _ = init_distributed()
    try:
        check(a)
        ids = prompt_ids(a)
        model = load_model(a)
        limit = model.args.max_seq_len
        if len(ids) + a.max_new_tokens > limit:
            raise SampleError(
                f"prompt ({len(ids)} tokens) + --max_new_tokens {a.max_new_tokens} exceeds the "
                f"model's context of {limit} tokens; shorten the prompt or ask for fewer tokens"
            )
    except UserError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    enc = get_tokenizer()
    stops = STOP_IDS
    device = model.rope_cos.device
    prompt = torch.tensor([ids] * a.num_samples, device=device)
    stream = a.num_samples == 1 and rank == 0
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
                print(f"--- sample {i}\n{enc.decode([t for t in toks if t not in stops])}")
        if a.output_json:
            Path(a.output_json).write_text(json.dumps({"prompt": ids, "tokens": new}) + "\n")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
