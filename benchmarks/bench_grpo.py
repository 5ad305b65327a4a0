#!/usr/bin/env python3
"""GRPO: ours vs TRL's GRPOTrainer on the bundled arithmetic task, the same model, prompts, reward
and settings, on CPU: the reward after N steps and the time per step (generation + training).

  python benchmarks/bench_grpo.py [--steps 6] [--warm CHECKPOINT] [--work DIR] [--lr 1e-4] [--threads 2]
                                  [--last 3] [--only ours|trl] [--json FILE]

Defaults take ~6 minutes on 2 idle cores: the warm start ~2, ours ~2 s a step, TRL ~20 s a step.

Both sides start from the same supervised warm start (the debug flavor after the command in
train_configs/grpo_debug.toml's header; --warm reuses a checkpoint or step folder, otherwise it is
trained into --work first, ~2 minutes on 2 cores), TRL from its Hugging Face export in fp32
(scripts/convert_dcp_to_safetensors.py). Per step: the same 4 prompts (our prompt order, fed to TRL
unshuffled; TRL renders them with the exported harmony template, reasoning_effort low: checked to
give our prompt tokens), 8 completions each, at most 24 new tokens, temperature 1, top-p 1; reward
exact_match + 0.1 x format scored by our own parse_reply on the completion token ids (TRL: two
reward functions weighted 1 and 0.1, summed then normalized per group, as ours); advantages
(r - mean) / (std + 1e-4) per group; token-level loss (TRL loss_type "dapo"), clips 0.2 / 0.28,
no KL, one update per batch, micro-batches of 8 completions (TRL: 8 per device x 4 accumulation
steps, one generation per optimizer step), grad-norm clip 1.0; AdamW (0.9, 0.95), eps 1e-8, no
weight decay, fused, our LR schedule (2 warmup steps, then constant: TRL gets the same LambdaLR);
no MoE auxiliary loss (TRL's default would take the exported config's 0.9) and no gradient
checkpointing (TRL's default; ours has none); seed 0; fp32. Both sides are deterministic run to run,
but they draw different samples (each its own random numbers): compare rewards over many steps.

Each side runs in its own process with the same number of torch threads (OMP_NUM_THREADS and
torch.set_num_threads), ours through `python -m gptoss_titan.train`, TRL through this script.
Step time: ours gen_time_s + reward_time_s + train_time_s from metrics.jsonl (the rollout;
prompts, rewards and advantages; then the update); TRL from on_step_begin to on_step_end of a TrainerCallback (its
generation and scoring measured inside). The median is taken after the first step (warm-up).
Also printed: the cores other processes kept busy during each side; on 2 cores any such contention
distorts the timings (ours more than TRL's), so compare only runs that report ~0.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = "train_configs/grpo_debug.toml"
# grpo_debug.toml's settings, which TRL gets too
PROMPTS, GROUP, MAX_NEW, MICRO, WARMUP = 4, 8, 24, 8, 2
# the warm start: grpo_debug.toml's header command
WARM_ARGS = [
    "--rl.enable=false", "--data.dataset=arithmetic_chat", "--training.steps=200", "--optimizer.lr=3e-3",
    "--lr_scheduler.warmup_steps=10", "--lr_scheduler.decay_type=cosine", "--lr_scheduler.min_lr_factor=0.1",
    "--checkpoint.interval=200", "--checkpoint.initial_load_path=",
]  # fmt: skip


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="GRPO steps of each side")
    p.add_argument(
        "--warm", help="warm-start checkpoint (run, checkpoint or step-N folder); default: train one"
    )
    p.add_argument(
        "--work", help="folder for the warm start, the export and the runs (default: a temporary one)"
    )
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each side")
    p.add_argument("--last", type=int, default=3, help="steps averaged for the first/last reward")
    p.add_argument("--only", choices=("ours", "trl"), help="run one side only")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--trl_child", nargs=2, metavar=("HF", "OUT"), help=argparse.SUPPRESS)
    return p.parse_args()


def _cpu() -> tuple[float, float]:
    """(CPU seconds every process used, CPU seconds of this process's finished children) (Linux)."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    busy = (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, ru.ru_utime + ru.ru_stime


def run(cmd: list[str], threads: int, log: Path, **env: str) -> tuple[float, float]:
    """Runs cmd in the repository with `threads` torch threads, output to log; -> (wall seconds,
    cores other processes kept busy meanwhile on average: the contention)."""
    t, (busy, mine) = time.perf_counter(), _cpu()
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": str(threads), **env})  # fmt: skip
    if r.returncode:
        sys.exit(f"failed (exit {r.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    wall, (busy2, mine2) = time.perf_counter() - t, _cpu()
    return wall, max(0.0, (busy2 - busy) - (mine2 - mine)) / wall


def warm_start(a: argparse.Namespace, work: Path) -> str:
    if a.warm:
        return a.warm
    out = work / "arith_sft"
    print(f"warm start: 200 supervised steps into {out} (~2 minutes on 2 cores)", flush=True)
    cmd = ["./scripts/run_train.sh", f"--job.dump_folder={out}", *WARM_ARGS]
    run(cmd, a.threads, work / "warm.log", CONFIG_FILE=CONFIG)
    return str(out / "checkpoint")


def run_ours(a: argparse.Namespace, warm: str, work: Path) -> dict:
    out = work / "ours"
    cmd = [
        sys.executable, "-m", "gptoss_titan.train", "--config", CONFIG, f"--job.dump_folder={out}",
        f"--checkpoint.initial_load_path={warm}", "--checkpoint.enable=false", f"--training.steps={a.steps}",
        f"--optimizer.lr={a.lr}", f"--training.seed={a.seed}", f"--training.local_batch_size={MICRO}",
        f"--rl.prompts_per_step={PROMPTS}", f"--rl.group_size={GROUP}", f"--rl.max_new_tokens={MAX_NEW}",
        f"--lr_scheduler.warmup_steps={WARMUP}", "--lr_scheduler.min_lr_factor=1.0",
        "--rl.temperature=1.0", "--rl.top_p=1.0", "--rl.kl_coef=0", "--rl.advantage_scale=group",
        "--rl.updates_per_batch=1", "--rl.clip_low=0.2", "--rl.clip_high=0.28", "--rl.loss=grpo",
        "--training.max_norm=1.0", "--optimizer.weight_decay=0.0", "--rl.reward=exact_match + 0.1*format",
    ]  # fmt: skip
    wall, others = run(cmd, a.threads, work / "ours.log")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "reward_mean" in r]
    return {
        "reward": [r["reward_mean"] for r in rows],
        "exact_match": [r["reward/exact_match"] for r in rows],
        "gen_s": [r["gen_time_s"] for r in rows],
        "train_s": [r["train_time_s"] for r in rows],
        "step_s": [r["gen_time_s"] + r["reward_time_s"] + r["train_time_s"] for r in rows],
        "response_len": [r["response_len_mean"] for r in rows],
        "process_wall_s": wall,
        "other_cores": others,
    }


def trl_child(a: argparse.Namespace) -> None:
    """TRL's GRPOTrainer on the HF export; writes per-step rewards and times as JSON."""
    import logging

    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from gptoss_titan.config import LRScheduler
    from gptoss_titan.rl.prompts import PromptLoader, load_prompts
    from gptoss_titan.rl.rewards import exact_match as em
    from gptoss_titan.rl.rewards import format_reward, parse_reply
    from gptoss_titan.train.optim import lr_factor

    hf, out = a.trl_child
    torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    tok = AutoTokenizer.from_pretrained(hf)
    # our trainer's prompts, step by step (the same loader, seed and order), fed to TRL unshuffled
    loader = PromptLoader(load_prompts("arithmetic", 4096, True), PROMPTS, 0, 1, a.seed)
    picked = [p for _ in range(a.steps) for p in loader.next_prompts()]
    effort = {p.conversation.get("reasoning_effort", "medium") for p in picked}
    assert len(effort) == 1, "TRL's chat_template_kwargs are global: one reasoning_effort for every row"
    kwargs = {"reasoning_effort": effort.pop()}
    for p in picked[:PROMPTS]:
        ids = tok.apply_chat_template(p.conversation["messages"], add_generation_prompt=True, tokenize=True,
                                      return_dict=True, **kwargs)["input_ids"]  # fmt: skip
        assert list(ids) == p.tokens, "the exported chat template renders other prompt tokens than ours"
    data = Dataset.from_list(
        [{"prompt": p.conversation["messages"], "answer": str(p.metadata["answer"])} for p in picked]
    )

    def exact_match(completions, answer, completion_ids, **_):
        return [em({}, parse_reply(list(c), MAX_NEW), {"answer": s}) for c, s in zip(completion_ids, answer)]

    def format(completions, completion_ids, **_):  # the name TRL logs the term under
        return [format_reward({}, parse_reply(list(c), MAX_NEW), {}) for c in completion_ids]

    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                            fused=True)  # fmt: skip
    sched_cfg = LRScheduler(warmup_steps=WARMUP, decay_type="linear", min_lr_factor=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i + 1, a.steps, sched_cfg))
    args = GRPOConfig(
        output_dir=str(Path(out).parent / "trl_out"), max_steps=a.steps, seed=a.seed, data_seed=a.seed,
        per_device_train_batch_size=MICRO, gradient_accumulation_steps=PROMPTS * GROUP // MICRO,
        num_generations=GROUP, max_completion_length=MAX_NEW, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=a.lr, beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo",
        scale_rewards="group", num_iterations=1, max_grad_norm=1.0, reward_weights=[1.0, 0.1],
        router_aux_loss_coef=0.0, shuffle_dataset=False, chat_template_kwargs=kwargs,
        use_cpu=True, bf16=False, fp16=False, report_to="none", logging_steps=1, save_strategy="no",
        gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    trainer = GRPOTrainer(model=model, reward_funcs=[exact_match, format], args=args, train_dataset=data,
                          processing_class=tok, optimizers=(opt, sched), callbacks=[Timer()])  # fmt: skip
    gen: list[float] = []
    score = trainer._generate_and_score_completions  # generation, rewards, advantages

    def timed(inputs):
        t = time.perf_counter()
        r = score(inputs)
        gen.append(time.perf_counter() - t)
        return r

    trainer._generate_and_score_completions = timed
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    res = {
        "reward": [h["reward"] for h in logs],
        "exact_match": [h.get("rewards/exact_match/mean") for h in logs],
        "gen_s": gen,
        "train_s": [t - g for t, g in zip(times, gen)],
        "step_s": times,
        "response_len": [h.get("completions/mean_length") for h in logs],
        "attn_implementation": model.config._attn_implementation,
    }
    Path(out).write_text(json.dumps(res))


def run_trl(a: argparse.Namespace, hf: Path, work: Path) -> dict:
    out = work / "trl.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl_child", str(hf), str(out),
           f"--steps={a.steps}", f"--lr={a.lr}", f"--seed={a.seed}", f"--threads={a.threads}"]  # fmt: skip
    wall, others = run(cmd, a.threads, work / "trl.log")
    return {**json.loads(out.read_text()), "process_wall_s": wall, "other_cores": others}


def summary(r: dict, last: int) -> dict:
    steps, rew = r["step_s"], r["reward"]
    after = steps[1:] or steps
    return {
        "step_s_median": statistics.median(after),
        "gen_s_median": statistics.median(r["gen_s"][1:] or r["gen_s"]),
        "train_s_median": statistics.median(r["train_s"][1:] or r["train_s"]),
        "first_step_s": steps[0],
        "reward_first": statistics.fmean(rew[:last]),
        "reward_last": statistics.fmean(rew[-last:]),
        "exact_first": statistics.fmean(r["exact_match"][:last]),
        "exact_last": statistics.fmean(r["exact_match"][-last:]),
        "reward_all": statistics.fmean(rew),
        "exact_all": statistics.fmean(r["exact_match"]),
    }


def main() -> None:
    a = parse()
    if a.trl_child:
        trl_child(a)
        return
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_grpo_"))
    work.mkdir(parents=True, exist_ok=True)
    warm = warm_start(a, work)
    results = {}
    if a.only != "trl":
        print(f"ours: {a.steps} steps from {warm}", flush=True)
        results["ours"] = run_ours(a, warm, work)
    if a.only != "ours":
        hf = work / "hf"
        cmd = [sys.executable, "scripts/convert_dcp_to_safetensors.py", "--checkpoint", warm, "--output",
               str(hf), "--dtype", "float32", "--overwrite", "--quiet"]  # fmt: skip
        run(cmd, a.threads, work / "export.log")
        print(f"TRL: {a.steps} steps from its export {hf}", flush=True)
        results["trl"] = run_trl(a, hf, work)
    print(f"\n{a.steps} steps, {PROMPTS} prompts x {GROUP} completions, <= {MAX_NEW} new tokens, lr {a.lr}, "
          f"{a.threads} torch threads each; medians after step 1; rewards: mean of the first/last "
          f"{a.last} steps (of all)")  # fmt: skip
    print("| side | step (s) | generation (s) | update (s) | first step (s) | reward first -> last (all) "
          "| exact match first -> last (all) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for side, r in results.items():
        s = r["summary"] = summary(r, a.last)
        print(f"| {side} | {s['step_s_median']:.2f} | {s['gen_s_median']:.2f} | {s['train_s_median']:.2f} "
              f"| {s['first_step_s']:.2f} | {s['reward_first']:.3f} -> {s['reward_last']:.3f} "
              f"({s['reward_all']:.3f}) | {s['exact_first']:.3f} -> {s['exact_last']:.3f} "
              f"({s['exact_all']:.3f}) |")  # fmt: skip
    for side, r in results.items():
        print(f"{side} rewards per step: " + " ".join(f"{x:.3f}" for x in r["reward"]))
        print(f"{side}: process {r['process_wall_s']:.0f} s; other processes kept {r['other_cores']:.2f} "
              "cores busy meanwhile (more than ~0.1: the timings are contended)")  # fmt: skip
    if len(results) == 2:
        o, t = results["ours"]["summary"], results["trl"]["summary"]
        ratio = t["step_s_median"] / o["step_s_median"]
        results["speed_ratio_trl_over_ours"] = ratio
        print(f"step time TRL / ours: {ratio:.2f}x (generation {t['gen_s_median'] / o['gen_s_median']:.2f}x, "
              f"update {t['train_s_median'] / o['train_s_median']:.2f}x); work folder {work}")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
