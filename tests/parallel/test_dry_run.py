"""The fake-backend dry run at scale (parallel/dry_run.py) through scripts/run_train.sh."""

import pytest

from ..conftest import ROOT, run_train_sh

pytestmark = pytest.mark.slow


PP4 = ("--parallelism.pipeline_parallel_degree=4", "--training.global_batch_size=512")


@pytest.mark.parametrize(
    "config, extra, params, layout",
    [
        (
            "gpt_oss_120b",
            (),
            "116,829,156,672",
            "pp 1 x replicate 1 x shard 64 x cp 1 x tp 1 (efsdp 8 x ep 8)",
        ),
        # experts over ep 8 x efsdp 4 x tp 2 (columns)
        (
            "gpt_oss_120b",
            ("--parallelism.tensor_parallel_degree=2",),
            "116,829,156,672",
            "tp 2 (efsdp 4 x ep 8)",
        ),
        # 4 stages of 9 layers, 8 micro-batches (the table shows the largest pipeline rank)
        (
            "gpt_oss_120b",
            PP4,
            "116,829,156,672",
            "pp 4 x replicate 1 x shard 16 x cp 1 x tp 1 (efsdp 2 x ep 8)",
        ),
        ("gpt_oss_20b", (), "20,914,757,184", "(efsdp 8 x ep 8)"),
        (
            "gpt_oss_1b_active",
            (),
            "7,440,322,048",
            "(efsdp 8 x ep 8)",
        ),  # a custom shape ([model.args] over 20b)
    ],
)
def test_fake_backend_dry_run_at_scale(config, extra, params, layout):
    r = run_train_sh(
        {"COMM_MODE": "fake_backend", "NGPU": "64", "CONFIG_FILE": f"train_configs/{config}.toml"},
        "--parallelism.expert_parallel_degree=8",
        *extra,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    out = r.stdout
    assert f"({params} parameters) on 64 ranks" in out and layout in out, out
    if extra == PP4:
        assert "8 micro-batches" in out and out.count("(9 layers)") == 4
    for row in ("parameters (fp32)", "gradients (fp32)", "AdamW state (2 x fp32)", "largest all-gather"):
        assert row in out
    # experts per rank: all expert params / 64 ranks, in GiB of fp32
    line = next(x for x in out.splitlines() if x.startswith("parameters (fp32)"))
    experts_gib = float(line.split()[3])
    from gptoss_titan.config import model_args, parse_args

    a = model_args(parse_args(["--config", f"{ROOT}/train_configs/{config}.toml"]))
    expected = a.n_layers * a.num_experts * a._expert_params() * 4 / 64 / 2**30
    assert abs(experts_gib - expected) < 2e-3


@pytest.mark.parametrize(
    "extra, match",
    [
        (("--parallelism.expert_parallel_degree=3",), "does not divide"),
        (("--parallelism.pipeline_parallel_degree=4",), "needs at least 4 micro-batches"),
    ],
)
def test_dry_run_rejects_bad_mesh(extra, match):
    r = run_train_sh(
        {"COMM_MODE": "fake_backend", "NGPU": "64", "CONFIG_FILE": "train_configs/gpt_oss_120b.toml"}, *extra
    )
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    assert match in r.stderr


def test_activation_estimate_matches_what_autograd_saves():
    """The dry run's activation formula against the bytes autograd really keeps (saved-tensor
    hooks, unique storages) per extra token, debug flavor in fp32 without checkpointing: within 10%."""
    import dataclasses

    import torch

    from gptoss_titan.config import ActivationCheckpoint
    from gptoss_titan.model import FLAVORS, Transformer
    from gptoss_titan.parallel.dry_run import activation_bytes

    args = dataclasses.replace(FLAVORS["debug"], vocab_size=4096)
    with torch.device("meta"):
        m = Transformer(args)
    m.to_empty(device="cpu")
    m.init_weights(seed=0)

    def saved(T: int) -> int:
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
            return t

        x = torch.randint(0, 4096, (1, T))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x, x)
        return sum(seen.values())

    per_token = (saved(512) - saved(256)) / 256
    est = activation_bytes(args, 1, ActivationCheckpoint(mode="none"), 4)
    assert abs(est["blocks"] + 4 * args.dim - per_token) / per_token < 0.1, (est, per_token)


def test_lora_dry_run_plans_the_frozen_base_and_the_adapters():
    """20b, LoRA rank 16 on attention and experts, a bf16 base, on one GPU: the base in bf16 with no
    gradient or AdamW, the adapters (exactly r (in + out) per attention projection and per expert
    matrix) with fp32 gradients and AdamW."""
    r = run_train_sh(
        {"COMM_MODE": "fake_backend", "NGPU": "1", "CONFIG_FILE": "train_configs/gpt_oss_20b.toml"},
        "--parallelism.expert_parallel_degree=1",
        "--lora.rank=16",
        "--lora.targets=attention,experts",
        "--activation_checkpoint.mode=full",
        "--training.local_batch_size=1",
        "--training.global_batch_size=1",
        "--training.seq_len=4096",
    )
    assert r.returncode == 0, r.stderr[-4000:]
    from gptoss_titan.model import FLAVORS

    a, rank = FLAVORS["20b"], 16
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    attention = rank * ((a.dim + q) * 2 + (a.dim + kv) * 2)  # wq, wo; wk, wv
    experts = a.num_experts * rank * ((a.dim + 2 * a.moe_inter_dim) + (a.moe_inter_dim + a.dim))
    assert f"LoRA rank 16 ({a.n_layers * (attention + experts):,} adapter elements on this rank)" in r.stdout
    rows = {x[:26].strip(): x.split() for x in r.stdout.splitlines()}
    base_gib = float(rows["frozen base (bfloat16)"][-1])
    assert abs(base_gib - a.num_params() * 2 / 2**30) < 0.01  # every weight once, in bf16
    adam = float(rows["adapter AdamW (2 x fp32)"][-1])
    assert abs(adam - a.n_layers * (attention + experts) * 8 / 2**30) < 1e-3


def test_lora_dry_run_plans_an_mxfp4_base_for_one_24_gb_gpu():
    """train_configs/gpt_oss_20b_lora.toml as shipped (MXFP4-resident base, rank 16 on attention and
    experts, full AC, 4,096 tokens, one GPU), planned without its data folder: the experts as
    their uint8 blocks and scales (17 bytes per 32 values), the rest bf16, one layer's experts
    dequantized at a time; the sum within the 20 GiB the config promises."""
    r = run_train_sh(
        {"COMM_MODE": "fake_backend", "NGPU": "1", "CONFIG_FILE": "train_configs/gpt_oss_20b_lora.toml"}
    )
    assert r.returncode == 0, r.stderr[-4000:]
    from gptoss_titan.model import FLAVORS

    a = FLAVORS["20b"]
    rows = {x[:26].strip(): x.split() for x in r.stdout.splitlines()}
    dense, experts = (float(v) for v in rows["frozen base (MXFP4+bf16)"][-3:-1])
    expert_values = a.n_layers * a.num_experts * 3 * a.dim * a.moe_inter_dim  # gate_up 2 H I + down I H
    expert_bias = a.n_layers * a.num_experts * (2 * a.moe_inter_dim + a.dim)  # bf16
    assert abs(experts - (expert_values * 17 / 32 + expert_bias * 2) / 2**30) < 1e-3
    assert abs(dense - (a.num_params() - expert_values - expert_bias) * 2 / 2**30) < 1e-2
    layer_gate_up = a.num_experts * 2 * a.dim * a.moe_inter_dim * 2  # bf16, the larger matrix
    assert float(rows["MXFP4 experts dequantized"][-1]) >= layer_gate_up / 2**30
    assert float(rows["sum"][-1]) <= 20.0


def test_rl_dry_run_plans_what_sampling_holds():
    """GRPO of the 20b, full fine-tuning with a KL reference, 8 ranks (FSDP 8, EP 8), sequences of
    4,096 tokens, 64 prompts x 8 completions per step: each rank decodes its 8 prompts' 64
    completions at once (rl.generation_batch 64). The KV cache holds 4,096 slots on the 12 full
    layers and 128 on the 12 sliding ones, K and V of 8 heads x 64 in bf16; the gathered weights are
    the dense weights in bf16 (EP 8 leaves the experts unsharded by FSDP); the KL reference is a
    second copy of the fp32 parameters."""
    from gptoss_titan.model import FLAVORS

    r = run_train_sh(
        {"COMM_MODE": "fake_backend", "NGPU": "8", "CONFIG_FILE": "train_configs/gpt_oss_20b.toml"},
        "--rl.enable=true", "--rl.kl_coef=0.01", "--parallelism.expert_parallel_degree=8", "--training.seq_len=4096",
        "--rl.max_new_tokens=2048", "--rl.prompts_per_step=64", "--rl.group_size=8", "--training.local_batch_size=1",
        "--training.loss_spike_sigma=0",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    a = FLAVORS["20b"]
    rows = {x[:26].strip(): x.split() for x in r.stdout.splitlines()}
    slots = 12 * 4096 + 12 * 128
    kv = 64 * slots * 2 * a.n_kv_heads * a.head_dim * 2
    assert abs(float(rows["rollout KV cache"][-1]) - kv / 2**30) < 1e-3
    dense_fp32 = float(rows["parameters (fp32)"][-3])  # this rank's eighth of the dense weights
    assert abs(float(rows["rollout weights gathered"][-1]) - dense_fp32 * 8 / 2) < 0.01
    assert rows["RL KL reference (fp32)"][-3:] == rows["parameters (fp32)"][-3:]
    table = ("parameters (fp32)", "gradients (fp32)", "AdamW state (2 x fp32)", "RL KL reference (fp32)",
             "activations (estimate)", "loss (fused, chunked)", "rollout KV cache", "rollout weights gathered")  # fmt: skip
    assert abs(float(rows["sum"][-1]) - sum(float(rows[k][-1]) for k in table)) < 0.01
