"""RLTrainer: reinforcement learning (GRPO/GSPO, [rl] with rl.enable) in the Trainer's loop.

Everything but the step is the Trainer's (trainer.py): the model and its parallel passes, LoRA,
checkpoints and resume, signals, metrics.jsonl. A step here:
  1. this rank's prompts (rl/prompts.py; the position is the checkpoint's 'dataloader');
  2. rollouts: rl.group_size completions each from the current weights (rl/rollout.py), with a
     generator seeded by (seed, step, data-parallel rank);
  3. rewards (rl/rewards.py) on the parsed harmony replies, group-normalized advantages;
  4. the policy update (rl_step.py).
Metrics per step: reward_mean, reward_std, reward/<term>, response_len_mean/max, truncated_frac,
reward_errors, clip_frac, kl, entropy, logprob_diff_max, old_logprob_diff_max, gen_tokens_per_s,
train_tokens_per_s, gen_time_s, reward_time_s, train_time_s (and loss = the policy loss, grad_norm, lr as in training).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..infer.generate import is_sharded
from ..interop.convert import HFFolder, load_hf_into
from ..parallel.build import build_model
from ..parallel.fsdp import gathered_weights
from ..rl.loss import group_advantages
from ..rl.prompts import PromptLoader, load_prompts
from ..rl.rewards import RewardModel, exact_match, parse_reply
from ..rl.rollout import rollout, sampling_seed
from ..runtime.dtypes import dtype_of
from ..runtime.log import logger
from .metrics import StepResult
from .resume import choose_resume
from .rl_step import RLStep
from .state import ModelState, drop_absent
from .trainer import Trainer


class RLTrainer(Trainer):
    step_class = RLStep

    def __init__(self, cfg, checkpoint_writer=None, checkpoint_stager=None):
        super().__init__(cfg, checkpoint_writer, checkpoint_stager)
        rl = cfg.rl
        if (rl.kl_coef > 0 or rl.log_kl) and not cfg.lora.rank:  # LoRA: the base, adapters off (rl_step.py)
            try:
                self.train_module.reference = self._reference()
            except BaseException:
                self.stop_request.close()
                self.run_lock.release()
                raise
        sharded = is_sharded(self.train_module.model)
        c = cfg.compile
        # resolved once: compiled decode steps (one process), K and V in the compute dtype
        self.compile_decode = c.enable and "decode" in c.components and not sharded
        self.decode_dtype = dtype_of(cfg.training.mixed_precision_param)
        logger.info(
            f"rl: decode steps {'compiled (torch.compile, static shapes)' if self.compile_decode else 'eager'}"
            + (f"; FSDP weights gathered once per rollout: {rl.gather_weights}" if sharded else "")
        )

    def _reference(self):
        """Full fine-tuning's KL reference: a frozen copy of the policy as the run started, sharded
        like it - the seeded initialization (the same values at any layout), or
        checkpoint.initial_load_path's model; rebuilt so on every resume (never saved)."""
        cfg = self.cfg
        ref = build_model(cfg, self.plan, self.meshes, self.device, init=True).model
        ref.requires_grad_(False)
        ref.eval()
        start = choose_resume(dataclasses.replace(cfg.checkpoint, enable=False), self.dump, self.model_args)
        if start is None:
            logger.info(f"rl: KL reference = the initialization (seed {cfg.training.seed})")
        elif start.format == "hf":
            load_hf_into(ref, HFFolder(str(start.path)), self.model_args)
            logger.info(f"rl: KL reference = {start.path}")
        else:
            ms = ModelState(ref)
            state = {"model": ms.state_dict()}
            drop_absent(state["model"], start.path)
            self.checkpoint.load(start.path, state)
            ms.load_state_dict(state["model"])
            logger.info(f"rl: KL reference = {start.path}")
        return ref

    def open_data(self):
        rl, d = self.cfg.rl, self.dims
        if rl.prompts_per_step % d.dp_degree:
            raise ConfigError(
                f"rl.prompts_per_step = {rl.prompts_per_step} is not a multiple of the {d.dp_degree} "
                "data-parallel ranks; each samples its own share"
            )
        local = rl.prompts_per_step // d.dp_degree * rl.group_size
        if local % self.cfg.training.local_batch_size:
            raise ConfigError(
                f"training.local_batch_size = {self.cfg.training.local_batch_size} does not divide the {local} "
                "completions of a rank (rl.prompts_per_step / data-parallel ranks x rl.group_size)"
            )
        self.reward = RewardModel(rl.reward, rl.reward_default)
        needs_answer = any(t.fn is exact_match for t in self.reward.terms)
        room = self.cfg.training.seq_len - rl.max_new_tokens  # seq_len bounds prompt + completion
        prompts = load_prompts(rl.prompts, room, needs_answer)
        logger.info(f"rl: {len(prompts)} prompts from {rl.prompts}; reward = {rl.reward}")
        loader = PromptLoader(prompts, rl.prompts_per_step, self.dp_rank, d.dp_degree, self.cfg.training.seed)
        return loader, None

    def step_tokens(self, result: StepResult) -> int:
        return int(result.target_tokens)

    def train_step(self) -> StepResult:
        rl, step = self.cfg.rl, self.train_module
        t0 = time.perf_counter()
        prompts = self.train_loader.next_prompts()
        seed = sampling_seed(self.cfg.training.seed, self.step, self.dp_rank)
        with gathered_weights(step.model) if rl.gather_weights else contextlib.nullcontext():
            ro = rollout(step.model, prompts, rl.group_size, rl.max_new_tokens, rl.temperature, rl.top_p, seed,
                         self.device, step.autocast(), rl.generation_batch, self.decode_dtype,
                         self.compile_decode, self.cfg.training.seq_len)  # fmt: skip
        self.reward.errors = 0
        rewards, parts = [], []
        for i in range(len(ro.prompt_lens)):
            p = prompts[i // rl.group_size]
            reply = parse_reply(ro.completion(i), rl.max_new_tokens, ro.truncated[i])
            total, comp = self.reward(p.conversation, reply, p.metadata)
            rewards.append(total)
            parts.append(comp)
        r = torch.tensor(rewards, dtype=torch.float64)
        adv = group_advantages(r, rl.group_size, rl.advantage_scale).float()
        t1 = time.perf_counter()
        result = step.rl_update(ro, adv, self.step)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        times = {"gen": ro.seconds, "reward": t1 - t0 - ro.seconds, "train": t2 - t1}
        result.extra.update(self._rollout_stats(ro, rewards, parts, times, result))
        return result

    def _rollout_stats(self, ro, rewards, parts, times: dict[str, float], result) -> dict:
        """Global (every data-parallel rank's completions) reward and length statistics."""
        local = {
            "rewards": rewards,
            "parts": parts,
            "lens": ro.completion_lens,
            "trunc": ro.truncated,
            "errors": self.reward.errors,
            "times": times,
        }
        every = [local]
        if self.meshes is not None and dist.get_world_size() > 1:
            every = [None] * self.dims.dp_degree
            dist.all_gather_object(every, local, group=self.meshes.loss.get_group())
        rs = torch.tensor([x for e in every for x in e["rewards"]], dtype=torch.float64)
        lens = [n for e in every for n in e["lens"]]
        out = {
            "reward_mean": float(rs.mean()),
            "reward_std": float(rs.std()) if len(rs) > 1 else 0.0,
            "response_len_mean": sum(lens) / len(lens),
            "response_len_max": max(lens),
            "truncated_frac": sum(t for e in every for t in e["trunc"]) / len(lens),
            "reward_errors": sum(e["errors"] for e in every),
        }
        names = sorted({k for e in every for p in e["parts"] for k in p})
        for k in names:
            vals = [p[k] for e in every for p in e["parts"] if k in p]
            out[f"reward/{k}"] = sum(vals) / len(vals)
        gen_s, reward_s, train_s = (max(e["times"][k] for e in every) for k in ("gen", "reward", "train"))
        out["gen_tokens_per_s"] = sum(lens) / gen_s
        out["train_tokens_per_s"] = int(result.target_tokens) * self.cfg.rl.updates_per_batch / train_s
        out["gen_time_s"], out["reward_time_s"], out["train_time_s"] = gen_s, reward_s, train_s
        return out
