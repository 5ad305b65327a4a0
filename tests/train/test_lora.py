"""LoRA runs (train/lora_run.py, model/lora.py): the frozen base comes from initial_load_path and
never changes, checkpoints hold the adapters' state alone with the base's record, a resume is
exact, a changed base is refused, and 2-process layouts equal one process."""

import json
from pathlib import Path

import pytest
import torch

from gptoss_titan.checkpoint.files import checkpoint_fqns
from gptoss_titan.model.lora import is_adapter
from gptoss_titan.train import main

from ..conftest import losses, python_cmd, run_ok
from ..helpers.checkpoint import weights
from ..helpers.training import argv_for, host_batches, train_step_for

ADAPTERS = ("--lora.rank=4", "--lora.alpha=8", "--lora.targets=attention,experts,router")


def base_run(tmp, name: str, seed: int = 0) -> str:
    argv = argv_for(tmp, f"--job.dump_folder={tmp / name}", "--training.steps=2", "--checkpoint.enable=true",
                    "--validation.enable=false", f"--training.seed={seed}")  # fmt: skip
    assert main(argv) == 0
    return str(tmp / name / "checkpoint" / "step-2")


@pytest.fixture(scope="module")
def base(module_tmp):
    return base_run(module_tmp, "base")


def lora_argv(tmp, base: str, name: str, *extra: str) -> list[str]:
    return argv_for(tmp, f"--job.dump_folder={tmp / name}", *ADAPTERS, "--training.global_batch_size=4", f"--checkpoint.initial_load_path={base}",
                    "--checkpoint.enable=true", "--checkpoint.interval=2", "--validation.enable=false",
                    "--training.deterministic=true", "--optimizer.lr=1e-2", "--lr_scheduler.decay_steps=3", *extra)  # fmt: skip


def test_a_step_changes_the_adapters_alone(tmp_path):
    cfg, step = train_step_for(tmp_path, *ADAPTERS)
    before = {n: p.detach().clone() for n, p in step.model.named_parameters()}
    assert {n for n, p in step.model.named_parameters() if p.requires_grad} == {
        n for n in before if is_adapter(n)
    }
    optimized = {id(p) for g in step.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for n, p in step.model.named_parameters() if is_adapter(n)}
    for i in range(2):
        step(host_batches(step, seed=i), i)
    for n, p in step.model.named_parameters():
        assert torch.equal(p, before[n]) != is_adapter(n), n  # the base bitwise, every adapter moved


def test_adapter_checkpoints_resume_exactly_and_refuse_another_base(base, module_tmp):
    tmp = module_tmp
    assert main(lora_argv(tmp, base, "straight")) == 0
    ck = tmp / "straight" / "checkpoint" / "step-4"
    saved = checkpoint_fqns(ck)
    model_keys = {k for k in saved if k.startswith("model.")}
    assert model_keys and all(is_adapter(k) for k in model_keys)  # no frozen weight is saved
    assert not any(k.startswith("optimizer.") and not is_adapter(k) for k in saved if "param_groups" not in k)
    record = json.loads((ck / "lora_base.json").read_text())
    assert record["path"] == str(Path(base).resolve()) and len(record["sha256"]) == 64
    w = weights(ck)
    assert all(w[k].abs().sum() > 0 for k in w if k.endswith("lora_B") or k.endswith("_B"))
    # resumed at step 2: the same losses and adapters, bit for bit
    assert main(lora_argv(tmp, base, "resumed", "--training.steps=2")) == 0
    assert main(lora_argv(tmp, base, "resumed")) == 0
    assert losses(tmp / "resumed") == losses(tmp / "straight")
    w2 = weights(tmp / "resumed" / "checkpoint" / "step-4")
    assert all(torch.equal(w[k], w2[k]) for k in w)
    # another base under the same run folder: refused, nothing written
    other = base_run(tmp, "other_base", seed=7)
    before = (tmp / "resumed" / "config.json").read_text()
    assert main(lora_argv(tmp, other, "resumed", "--training.steps=6")) == 2
    assert (tmp / "resumed" / "config.json").read_text() == before
    assert main(lora_argv(tmp, "", "no_base")) == 2 and not (tmp / "no_base").exists()  # LoRA needs a base
    adapters_only = str(tmp / "straight" / "checkpoint" / "step-4")  # not a base
    assert main(lora_argv(tmp, adapters_only, "on_adapters")) == 2 and not (tmp / "on_adapters").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        ("--parallelism.data_parallel_shard_degree=2",),
        ("--parallelism.expert_parallel_degree=2",),
        ("--parallelism.pipeline_parallel_degree=2",),
        ("--parallelism.context_parallel_degree=2",),
        ("--parallelism.tensor_parallel_degree=2",),
    ],
)
def test_two_processes_equal_one(base, module_tmp, layout):
    """FSDP 2, FSDP 2 x EP 2, PP 2, CP 2 and TP 2 (adapters split with their weights: B by output
    features for q, k, v and gate-up, A by input features for o and down, the rest whole with
    their gradients summed over tp): losses and adapters equal one process (<= 1e-5). AdamW with eps = 1
    (far above every gradient): its update is then linear in the gradient, so the reduction
    order's rounding (~1e-7 relative) stays that small instead of being blown up to +-lr for
    gradients near zero, which the default eps = 1e-8 would do."""
    tmp, sgd_like = module_tmp, ("--optimizer.eps=1", "--optimizer.lr=0.5")
    one = tmp / "one_eps1"
    if not (one / "checkpoint" / "step-4").is_dir():
        assert main(lora_argv(tmp, base, one.name, *sgd_like)) == 0
    name = "two_" + layout[0].split(".")[-1].split("=")[0]
    run_ok(python_cmd(2, "-m", "gptoss_titan.train", *lora_argv(tmp, base, name, *sgd_like, *layout)))
    assert losses(tmp / name) == pytest.approx(losses(one), rel=1e-5)
    a, b = weights(one / "checkpoint" / "step-4"), weights(tmp / name / "checkpoint" / "step-4")
    assert a.keys() == b.keys() and all(is_adapter(k) for k in a)
    for k in a:
        assert a[k].abs().max() > 0 or not k.endswith("B")
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "extra,exact",
    [
        (("--activation_checkpoint.mode=full",), True),
        (("--activation_checkpoint.mode=selective",), True),
        (("--training.document_mask=true",), True),
        (("--compile.enable=true",), False),
    ],
)
def test_adapters_compose_with_activation_checkpointing_compile_and_document_masks(
    base, module_tmp, extra, exact
):
    """The same LoRA losses with full or per-op AC, document masks (bitwise) and compile (1e-5)."""
    tmp = module_tmp
    plain = tmp / "plain"
    if not (plain / "metrics.jsonl").is_file():
        assert main(lora_argv(tmp, base, plain.name, "--checkpoint.enable=false")) == 0
    name = "with_" + extra[0].split(".")[-1].split("=")[0]
    assert main(lora_argv(tmp, base, name, "--checkpoint.enable=false", *extra)) == 0
    if exact:
        assert losses(tmp / name) == losses(plain)
    else:
        assert losses(tmp / name) == pytest.approx(losses(plain), rel=1e-5)


def test_the_frozen_base_is_stored_in_the_compute_dtype(tmp_path):
    """lora.base_format auto: with bf16 compute the base is kept in bf16 (never updated, so no fp32
    master), the adapters in fp32; a bf16 base with fp32 compute is refused in one line."""
    from gptoss_titan.config import ConfigError, parse_args

    _, step = train_step_for(tmp_path, *ADAPTERS, "--training.mixed_precision_param=bfloat16")
    dtypes = {n: p.dtype for n, p in step.model.named_parameters()}
    assert all((d == torch.float32) == is_adapter(n) for n, d in dtypes.items())
    loss = step(host_batches(step), 0)
    assert torch.isfinite(torch.as_tensor(loss.loss))
    with pytest.raises(
        ConfigError, match="lora.base_format = 'bfloat16' computes with the frozen weights as stored"
    ):
        parse_args(argv_for(tmp_path, *ADAPTERS, "--lora.base_format=bfloat16"))


@pytest.mark.slow
def test_lora_debug_config_through_run_train_sh(tmp_path):
    """train_configs/lora_debug.toml as users run it, on a saved debug-model base (a few steps of
    each here), then the adapter export."""
    from ..conftest import one_line_error, run_train_sh
    from ..helpers.convert import convert

    short = ("--training.seq_len=128", "--validation.enable=false", "--training.steps=2")
    r = run_train_sh({}, *short, f"--job.dump_folder={tmp_path / 'debug'}", "--checkpoint.enable=true")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train_sh(
        {"CONFIG_FILE": "train_configs/lora_debug.toml"},
        *short,
        f"--job.dump_folder={tmp_path / 'lora'}",
        f"--checkpoint.initial_load_path={tmp_path / 'debug' / 'checkpoint'}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loaded the frozen base from" in r.stdout and len(losses(tmp_path / "lora")) == 2
    r = convert(
        "--checkpoint", str(tmp_path / "lora"), "--output", str(tmp_path / "adapter"), "--lora", "adapter"
    )
    assert r.returncode == 0 and (tmp_path / "adapter" / "adapter_model.safetensors").is_file(), r.stderr
    # a refused base at the shell: the LoRA run's own checkpoint is not a base (one line, exit 2)
    r = run_train_sh(
        {"CONFIG_FILE": "train_configs/lora_debug.toml"},
        *short,
        f"--job.dump_folder={tmp_path / 'lora2'}",
        f"--checkpoint.initial_load_path={tmp_path / 'lora' / 'checkpoint'}",
    )
    assert r.returncode == 2 and "is a LoRA run's checkpoint (adapters only)" in one_line_error(r.stderr)
    assert not (tmp_path / "lora2").exists()


@pytest.mark.slow
def test_two_process_resume_is_bitwise(base, module_tmp):
    """FSDP 2 x EP 2: stopped at step 2 and resumed, the same losses and adapters bit for bit."""
    tmp, layout = module_tmp, ("--parallelism.expert_parallel_degree=2",)

    def run(name, *extra):
        run_ok(python_cmd(2, "-m", "gptoss_titan.train", *lora_argv(tmp, base, name, *layout, *extra)))

    run("ep_straight")
    run("ep_resumed", "--training.steps=2")
    run("ep_resumed")
    assert losses(tmp / "ep_resumed") == losses(tmp / "ep_straight")
    a, b = (weights(tmp / n / "checkpoint" / "step-4") for n in ("ep_straight", "ep_resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_dropout_adapters_under_activation_checkpointing_get_the_forwards_masks(tmp_path, mode):
    """lora.dropout with AC: the recompute replays the forward's dropout masks (preserve_rng_state),
    so a step updates the adapters as without AC; a different mask would give other gradients."""
    results = []
    for ac in ("none", mode):
        _, step = train_step_for(
            tmp_path, *ADAPTERS, "--lora.dropout=0.3", f"--activation_checkpoint.mode={ac}"
        )
        torch.manual_seed(0)
        step(host_batches(step), 0)
        results.append(
            {
                n.replace("_checkpoint_wrapped_module.", ""): p.detach().clone()
                for n, p in step.model.named_parameters()
                if is_adapter(n)
            }  # fmt: skip
        )
    plain, ckpt = results
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-6, atol=1e-7, msg=n)
