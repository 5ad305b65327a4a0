"""The small trainer run most trainer tests start from."""

from ..conftest import synthetic_data


def argv_for(tmp_path, *extra):
    """4 steps of 2 x 32 tokens of the bench flavor on synthetic data (tmp_path/data, vocabulary
    8192), validation every 2 steps, into tmp_path/run; extra overrides go last."""
    data = synthetic_data(tmp_path / "data")
    return [
        "--model.flavor=bench",
        f"--data.dataset_path={data}",
        f"--job.dump_folder={tmp_path / 'run'}",
        "--training.steps=4",
        "--training.seq_len=32",
        "--training.local_batch_size=2",
        "--metrics.log_freq=1",
        "--validation.freq=2",
        "--validation.steps=2",
        "--lr_scheduler.warmup_steps=1",
        "--optimizer.lr=3e-3",
        *extra,
    ]


def train_step_for(tmp_path, *extra):
    """(cfg, TrainStep) of argv_for's run on one process, built as the trainer builds it, without a
    trainer around it (no run folder is written)."""
    import torch

    from gptoss_titan.config import parse_args
    from gptoss_titan.parallel.build import build_model, plan_run
    from gptoss_titan.train.step import TrainStep

    cfg = parse_args(argv_for(tmp_path, *extra))
    plan = plan_run(cfg, 1)
    cpu = torch.device("cpu")
    return cfg, TrainStep(cfg, plan, build_model(cfg, plan, None, cpu), None, cpu)


def host_batches(step, seed: int = 0) -> list:
    """accum_steps host batches (inputs, targets) int64 [B, T] of random token ids."""
    import torch

    t, g = step.cfg.training, torch.Generator().manual_seed(seed)
    out = []
    for _ in range(step.plan.accum_steps):
        w = torch.randint(0, step.plan.args.vocab_size, (t.local_batch_size, t.seq_len + 1), generator=g)
        out.append((w[:, :-1], w[:, 1:]))
    return out


# argv_for's bench flavor cut down for unit tests of the step and the state (0.6M parameters)
SMALL = (
    "--model.args.dim=64",
    "--model.args.n_layers=2",
    "--model.args.head_dim=16",
    "--model.args.moe_inter_dim=64",
)
