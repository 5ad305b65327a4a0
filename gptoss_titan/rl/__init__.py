"""Reinforcement learning's parts (docs/rl.md): prompts (prompts.py), rollouts from the training
weights (rollout.py), rewards (rewards.py) and the GRPO / GSPO objective (loss.py). The trainer
and the update step that use them are train/rl_trainer.py and train/rl_step.py."""
