"""The checks of a loaded config (config/validation.py): value ranges, the batch layout, parallel
degrees against the model, pipeline stages, the model's args over its flavor."""

import pytest

from gptoss_titan.config import ConfigError, parse_args

from ..helpers.config import write


@pytest.mark.parametrize(
    "toml, argv, match",
    [
        ("[optimizer]\nlr = -1e-3\n", [], "optimizer.lr = -0.001 must be > 0"),
        ("[training]\nseq_len = 5000\n", [], "exceeds the debug model's limit 4096"),
        ("[training]\nlocal_batch_size = 4\nglobal_batch_size = 6\n", [], "global_batch_size = 6"),
        ("[model]\nflavor = '20B'\n", [], "did you mean '20b'"),
        ("[[data.sources]]\npath = 'a'\nweight = -1\n", [], r"data.sources\[0\] \(a\) weight = -1.0 must be"),
        ("[[data.sources]]\nweight = 2\n", [], r"data.sources\[0\] has no path"),
        ("[data]\ndataset_path = 'x'\n[[data.sources]]\npath = 'a'\n", [], "both set"),
        ("", ["--data.sources=a:0"], r"weight = 0.0 must be a positive number"),
        (
            "",
            ["--parallelism.pipeline_parallel_degree=2", "--parallelism.pipeline_parallel_layers=3,2"],
            r"pipeline_parallel_layers = \[3, 2\] must list 2 stages .* adding up to the model's 4",
        ),
        (
            "",
            [
                "--parallelism.pipeline_parallel_degree=2",
                "--parallelism.pipeline_parallel_schedule=Interleaved1F1B",
            ],
            "interleaved schedules need 2 or more stages per rank",
        ),
        ("", ["--parallelism.pipeline_parallel_layers=2,2"], "pipeline_parallel_degree = 1; set pipeline"),
        (
            "",
            ["--parallelism.pipeline_parallel_degree=3", "--parallelism.pipeline_parallel_layers=2,0,2"],
            r"\[2, 0, 2\] must list 3 stages .* each >= 1",
        ),
        (
            "",
            ["--parallelism.pipeline_parallel_degree=2", "--parallelism.pipeline_parallel_schedule=ZBV"],
            "pipeline_parallel_schedule",
        ),
        (
            "",
            ["--parallelism.pipeline_parallel_degree=2", "--model.aux_loss_coef=0.01"],
            "aux_loss_coef = 0.01 is not supported with pipeline parallelism yet",
        ),
        (
            "",
            ["--parallelism.tensor_parallel_degree=4"],
            r"does not divide the model's n_kv_heads = 2 .*divisor of 2",
        ),
        (
            "[model.args]\nn_kv_heads = 4\nn_heads = 8\n",
            ["--parallelism.tensor_parallel_degree=4", "--training.seq_len=30"],
            r"seq_len = 30 is not divisible by tensor_parallel_degree = 4",
        ),
        (
            "",
            [
                "--parallelism.tensor_parallel_degree=2",
                "--parallelism.context_parallel_degree=2",
                "--training.seq_len=36",
            ],
            r"seq_len = 36 is not divisible by 2 x context_parallel_degree x tensor_parallel_degree = 8",
        ),
        ("", ["--parallelism.expert_parallel_degree=3"], "does not divide the 8 experts"),
        (
            "",
            ["--parallelism.context_parallel_degree=3"],
            "seq_len = 256 is not divisible by 2 x parallelism",
        ),
        ("", ["--lr_scheduler.decay_type=cosin"], "did you mean 'cosine'"),
        (
            "",
            ["--model.flavor=bench", "--data.dataset_path=/data", "--metrics.sample_freq=5"],
            "set --metrics.sample_freq=0",
        ),
    ],
)
def test_bad_config(tmp_path, toml, argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(["--config", write(tmp_path, toml)] + argv)


@pytest.mark.parametrize(
    "argv, match",
    [
        (
            ["--model.args.top_k=9"],
            r"on flavor debug \(overrides: top_k=9\): top_k = 9 must be between 1 and num_experts = 8",
        ),
        (["--model.args.n_kv_heads=3"], "n_heads = 4 must be a multiple of n_kv_heads = 3"),
        (["--model.args.head_dim=33"], "head_dim = 33 must be even"),
        (["--model.args.norm_eps=0"], "norm_eps = 0.0 must be > 0"),
        (["--model.args.rope_factor=0.5"], "rope_factor = 0.5 must be >= 1"),
        (["--model.args.num_experts=0"], "num_experts = 0 must be >= 1"),
        (
            ["--model.args.vocab_size=1000"],
            "vocab_size = 1000 is smaller than the o200k_harmony tokenizer's 201088",
        ),
        (["--model.aux_loss_type=pooled"], "model.aux_loss_type = 'pooled' is not one of per_layer, hf"),
        (["--model.args.load_balance_bias=true"], "set model.load_balance_bias instead"),
        (
            ["--model.load_balance_bias_update=pid"],
            "model.load_balance_bias_update = 'pid' is not one of sign, proportional",
        ),
        (["--model.balanced_routing=1.3"], "with model.load_balance_bias = true \\(it is false\\)"),
        (["--model.load_balance_bias=true", "--model.balanced_routing=0.5"], "must be 0 \\(off\\) or >= 1"),
        (["--model.args.balanced_routing=1.3"], "set model.balanced_routing instead"),
        (["--model.balanced_routing_steps=-1"], "model.balanced_routing_steps = -1 must be >= 0"),
        (
            ["--model.load_balance_bias=true", "--model.balanced_routing=1.3", "--lora.rank=4"],
            "model.balanced_routing = 1.3 with lora.rank > 0 .*; set it to 0",
        ),
        (
            ["--model.load_balance_bias=true", "--model.balanced_routing=1.3", "--rl.enable=true"],
            "model.balanced_routing = 1.3 with rl.enable .*; set it to 0",
        ),
    ],
)
def test_bad_model_args(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(["--data.dataset=kjv", *argv])


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--lora.rank=-1"], r"lora.rank = -1 must be >= 1 for adapters \(0 = off"),
        (
            ["--lora.rank=8", "--lora.targets=attention,mlp"],
            "lora.targets entry = 'mlp' is not one of attention, experts, router",
        ),
        (["--lora.rank=8", "--lora.targets="], "lora.targets is empty"),
        (["--lora.rank=8", "--lora.layers=0,7"], r"lora.layers holds 7, but the model has layers 0..3"),
        (["--lora.rank=8", "--lora.alpha=0"], "lora.alpha = 0.0 must be > 0"),
        (["--lora.rank=8", "--lora.dropout=1"], r"lora.dropout = 1.0 in \[0, 1\)"),
        (
            [
                "--lora.rank=8",
                "--lora.base_format=mxfp4",
                "--checkpoint.initial_load_format=hf",
                "--model.args.moe_inter_dim=96",
                "--parallelism.tensor_parallel_degree=2",
            ],
            r"each rank's 48 expert columns must be whole MXFP4 blocks of 32",
        ),  # fmt: skip
        (["--lora.rank=8", "--training.mxfp4_qat=true"], "training.mxfp4_qat with lora.rank > 0"),
    ],
)
def test_bad_lora_section(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(["--data.dataset=kjv", "--model.flavor=debug", *argv])


def test_a_bad_lora_section_is_one_line_and_exit_2_from_the_config_check():
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "gptoss_titan.config", "--lora.rank=8", "--lora.targets=experts,mlp"],
        capture_output=True,
        text=True,
    )
    assert (
        r.returncode == 2
        and r.stderr.startswith("error: lora.targets entry = 'mlp'")
        and r.stderr.count("\n") == 1
    )
