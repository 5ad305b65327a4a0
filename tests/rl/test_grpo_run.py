"""GRPO runs through the command users run (scripts/run_train.sh, train_configs/grpo_debug.toml) on
the debug model from random weights, short completions: the recorded old log-probs equal the
trained ones bitwise on 1 and 2 processes (FSDP + EP), the decode path's difference is logged and
small, a resumed run continues bitwise, and bad or failing rewards behave as promised."""

import json

import pytest
import torch

from gptoss_titan.data.arithmetic import arithmetic_rows
from gptoss_titan.data.chat import render
from gptoss_titan.model.loss import IGNORE_INDEX

from ..conftest import one_line_error, read_metrics, run_train_sh, two_at_a_time
from ..helpers.convert import ours_from
from ..helpers.equivalence import DETAIL

pytestmark = pytest.mark.slow

CFG = {"CONFIG_FILE": "train_configs/grpo_debug.toml"}
# random weights (no warm start), 2 prompts x 4 completions of 6 tokens, 2 updates per batch (the
# old log-probs recorded by their own pass), a micro-batch of 4
SMALL = ("--checkpoint.initial_load_path=", "--rl.prompts_per_step=2", "--rl.group_size=4",
         "--rl.max_new_tokens=6", "--rl.updates_per_batch=2", "--training.local_batch_size=4",
         "--optimizer.lr=1e-3", "--training.seed=3")  # fmt: skip


# Random weights never write a well-formed reply, so the built-in rewards would all be 0 (no
# advantage, no update): these runs score the share of even token ids instead.
EVEN = "def score(prompt, reply, metadata):\n    return sum(t % 2 == 0 for t in reply.tokens) / len(reply.tokens)\n"


def run(folder, *args, ngpu=1, env=None):
    mods = folder.parent / "reward_mods"
    mods.mkdir(exist_ok=True)
    (mods / "even_rewards.py").write_text(EVEN)
    env = {**CFG, "NGPU": str(ngpu), "PYTHONPATH": str(mods), **(env or {})}
    r = run_train_sh(
        env, f"--job.dump_folder={folder}", *SMALL, "--rl.reward=even_rewards:score + 0.1*format", *args
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    return read_metrics(folder)


KEYS = ("loss", "grad_norm", "reward_mean", "entropy", "clip_frac", "response_len_mean", "logprob_diff_max")


@pytest.fixture(scope="module")
def full(module_tmp):
    """4 steps on one process, a checkpoint every 2 (its first 2 steps are also the one-process
    reference of the tensor-parallel run: saving does not touch the numbers)."""
    return run(module_tmp / "full", "--training.steps=4", "--checkpoint.interval=2")


@pytest.fixture(scope="module")
def seed(module_tmp):
    """A seed checkpoint (the starting weights) of grpo_debug.toml's model."""
    base = module_tmp / "base"
    r = run_train_sh({**CFG, "NGPU": "1"}, f"--job.dump_folder={base}", "--checkpoint.create_seed_checkpoint=true",
                     "--checkpoint.initial_load_path=")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return base / "checkpoint"


def test_old_logprobs_are_the_trained_ones_and_resume_is_bitwise(full, tmp_path):
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    for r in full:
        assert r["old_logprob_diff_max"] == 0.0  # recorded and trained: the same forward, bitwise
        # KV-cached one-row decoding against the batched forward, fp32: rounding only (1e-7 relative
        # per op; log-probs of order 10 over 4 layers)
        assert 0 <= r["logprob_diff_max"] < 1e-3
        assert r["target_tokens"] == 8 * 6 and r["reward_std"] > 0 and "reward/even_rewards:score" in r
    assert max(r["clip_frac"] for r in full) > 0  # the second update of a batch moves past the clips
    cut = tmp_path / "cut"
    run(cut, "--training.steps=2", "--checkpoint.interval=2")
    resumed = run(cut, "--training.steps=4", "--checkpoint.interval=2")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full[2:], resumed[2:]):
        assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}  # prompts, samples and update: bitwise


def test_two_processes_fsdp_and_expert_parallel(tmp_path):
    rows = run(tmp_path / "ep", "--training.steps=2", "--parallelism.expert_parallel_degree=2", ngpu=2)
    for r in rows:
        assert r["old_logprob_diff_max"] == 0.0 and r["logprob_diff_max"] < 1e-3
        assert r["target_tokens"] == 8 * 6  # both ranks' completions (one prompt each)


def test_tensor_parallel_equals_one_process(full, tmp_path):
    """Tensor parallelism 2 (one data-parallel rank: the same prompts and sampling seed as one
    process): decoding gathers the vocabulary-split logits, so both draw the same completions; the
    log-probs come through the vocabulary-parallel head (model/logprobs.py). The updates agree to
    fp32 rounding of other summation orders, the old log-probs are the trained ones bitwise. Run
    under TORCH_DISTRIBUTED_DEBUG=DETAIL: every collective (the rollout's done flags and gathered
    logits, the rewards' all_gather_object, the update) consistent across the ranks."""
    one = full[:2]
    tp = run(
        tmp_path / "tp", "--training.steps=2", "--parallelism.tensor_parallel_degree=2", ngpu=2, env=DETAIL
    )
    for a, b in zip(one, tp):
        assert b["old_logprob_diff_max"] == 0.0 and b["logprob_diff_max"] < 1e-3
        assert (a["reward_mean"], a["response_len_mean"]) == (b["reward_mean"], b["response_len_mean"])
        for k in ("loss", "grad_norm", "entropy"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


def test_compiled_blocks_and_decode_with_activation_checkpointing(tmp_path):
    """compile.enable (each block's attention and norms, and the rollout's decode step) with full
    activation checkpointing: the old log-probs are still the trained ones bitwise, and the compiled
    decode's difference from the training forward is rounding."""
    rows = run(
        tmp_path / "c", "--training.steps=2", "--compile.enable=true", "--activation_checkpoint.mode=full"
    )
    for r in rows:
        assert r["old_logprob_diff_max"] == 0.0 and 0 <= r["logprob_diff_max"] < 1e-3
        assert r["target_tokens"] == 8 * 6


def test_bad_reward_is_one_line_and_a_raising_reward_is_counted(tmp_path):
    folder = tmp_path / "bad"
    cases = {
        "--rl.reward=no_such_rewards:score": "module 'no_such_rewards' cannot be imported",
        "--rl.prompts=no/such.jsonl": "rl.prompts 'no/such.jsonl' not found",
        "--rl.loss=ppo": "rl.loss = 'ppo' is not one of grpo, gspo",
    }
    launches = [(f"--job.dump_folder={folder}", *SMALL, arg) for arg in cases]
    for r, message in zip(
        two_at_a_time(lambda a: run_train_sh({**CFG, "NGPU": "1"}, *a), launches), cases.values()
    ):
        assert r.returncode == 2 and message in one_line_error(r.stderr), r.stderr[-2000:]
    assert not folder.exists()  # nothing written
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "flaky_rewards.py").write_text(
        "def score(prompt, reply, metadata):\n"
        "    if len(reply.tokens) == 6:  # every one here: random weights never stop early\n"
        "        raise RuntimeError('cannot score this one')\n"
        "    return 1.0\n"
    )
    rows = run(tmp_path / "flaky", "--training.steps=1", "--rl.reward=flaky_rewards:score",
               "--rl.reward_default=-0.5", env={"PYTHONPATH": f"{mods}:{tmp_path / 'reward_mods'}"})  # fmt: skip
    assert rows[0]["reward_errors"] == 8 and rows[0]["reward_mean"] == -0.5  # every completion: the default


def test_lora_gspo_with_kl_to_the_base(seed, tmp_path):
    """LoRA: the reference is the base with the adapters off. The adapters start at B = 0, so the
    first step's policy is the base exactly (KL 0.0); after an update it is not."""
    rows = run(tmp_path / "lora", "--training.steps=2", f"--checkpoint.initial_load_path={seed}",
               "--lora.rank=4", "--rl.kl_coef=0.1", "--rl.loss=gspo", "--rl.clip_low=3e-4", "--rl.clip_high=4e-4")  # fmt: skip
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0
    assert all(r["old_logprob_diff_max"] == 0.0 for r in rows)


# The warm start of grpo_debug.toml's header: supervised steps on the answered arithmetic task.
WARM = ("--rl.enable=false", "--data.dataset=arithmetic_chat", "--training.steps=200", "--optimizer.lr=3e-3",
        "--lr_scheduler.warmup_steps=10", "--lr_scheduler.decay_type=cosine", "--lr_scheduler.min_lr_factor=0.1",
        "--checkpoint.interval=200", "--checkpoint.initial_load_path=", "--metrics.log_freq=50")  # fmt: skip


def answer_logprob(step_dir) -> float:
    """The model's mean log-probability (over the two RL questions) of the right final message
    after the reference reasoning: a deterministic measure of what GRPO rewards."""
    model = ours_from(step_dir)
    total = 0.0
    for row in arithmetic_rows(2, seed=7, answered=True):
        tokens, mask = render(row, "final")  # the targets: the final channel's message
        t = torch.tensor(tokens)
        y = torch.where(torch.tensor(mask[1:]), t[1:], IGNORE_INDEX)
        with torch.no_grad():
            total -= float(model(t[None, :-1], y[None])[0])
    return total / 2


def test_reward_rises_on_the_toy_task(tmp_path):
    """After the warm start (format learned, sums partly), GRPO on two of the task's questions, each
    rollout batch used for 4 clipped updates, 12 steps: the log-probability of the right final
    answer rises (measured over 4 sampling seeds: by 0.39-0.81 nats from -2.01), and the sampled
    reward's mean over the last 4 steps beats the first 4's (by 0.15-0.30, from 0.12-0.21).
    The warm start's loss is on the replies alone: 1/8 of its rows reach the lm_head."""
    warm = tmp_path / "warm"
    r = run_train_sh({**CFG, "NGPU": "1"}, f"--job.dump_folder={warm}", *WARM, timeout=1800)  # ~100 s alone
    assert r.returncode == 0, r.stderr[-3000:]
    config = (warm / "config.json").read_bytes()
    r = run_train_sh({**CFG, "NGPU": "1"}, f"--job.dump_folder={warm}")  # RL in the supervised run's folder
    assert r.returncode == 2 and "rl.enable = True but the checkpoint" in one_line_error(r.stderr)
    assert "checkpoint.initial_load_path" in one_line_error(r.stderr)
    assert (warm / "config.json").read_bytes() == config  # nothing written
    prompts = tmp_path / "two.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in arithmetic_rows(2, seed=7)))
    rl = tmp_path / "rl"
    r = run_train_sh({**CFG, "NGPU": "1"}, f"--job.dump_folder={rl}", f"--checkpoint.initial_load_path={warm / 'checkpoint'}",
                     f"--rl.prompts={prompts}", "--rl.prompts_per_step=2", "--training.steps=12", "--optimizer.lr=5e-4", "--rl.updates_per_batch=4",
                     "--checkpoint.interval=12", timeout=1800)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    before, after = answer_logprob(warm / "checkpoint/step-200"), answer_logprob(rl / "checkpoint/step-12")
    assert after > before + 0.2, (before, after)
    rewards = [row["reward_mean"] for row in read_metrics(rl)]
    assert sum(rewards[-4:]) > sum(rewards[:4]), rewards


def test_full_finetuning_kl_to_a_frozen_copy_resumes_bitwise(seed, tmp_path):
    """Full fine-tuning: the reference is a frozen copy of the starting weights (here a seed
    checkpoint), rebuilt on resume: KL 0.0 at step 1, > 0 after, and a resumed run's KL equals the
    uninterrupted run's."""
    args = (
        f"--checkpoint.initial_load_path={seed}",
        "--rl.kl_coef=0.05",
        "--checkpoint.interval=2",
    )
    full = run(tmp_path / "full", "--training.steps=3", *args)
    assert full[0]["kl"] == 0.0 and full[1]["kl"] > 0 and full[2]["kl"] > 0
    cut = tmp_path / "cut"
    run(cut, "--training.steps=2", *args)
    resumed = run(cut, "--training.steps=3", *args)
    assert {k: full[2][k] for k in (*KEYS, "kl")} == {k: resumed[2][k] for k in (*KEYS, "kl")}
