"""Loading a config (config/loading.py): TOML files, --section.field=value overrides, tables and
lists of tables, strict keys and types, --help."""

import subprocess
import sys

import pytest

from gptoss_titan.config import ConfigError, JobConfig, help_text, parse_args

from ..conftest import ROOT
from ..helpers.config import write


def test_defaults_and_overrides(tmp_path):
    f = write(tmp_path, "[training]\nsteps = 7\n[optimizer]\nlr = 1\n")
    cfg = parse_args(
        [
            "--config",
            f,
            "--training.seq_len=64",
            "--optimizer.lr",
            "0.5",
            "--checkpoint.exclude_from_loading=optimizer,dataloader",
            "--checkpoint.enable=true",
        ]
    )
    assert cfg.training.steps == 7 and cfg.training.seq_len == 64
    assert cfg.optimizer.lr == 0.5 and isinstance(cfg.optimizer.lr, float)
    assert (
        cfg.checkpoint.exclude_from_loading == ["optimizer", "dataloader"] and cfg.checkpoint.enable is True
    )
    assert cfg.job.config_file == f


def test_repo_configs_load():
    for name in (
        "debug_model",
        "gpt_oss_20b",
        "gpt_oss_120b",
        "sft_debug",
        "gpt_oss_20b_sft",
        "lora_debug",
        "gpt_oss_20b_lora",
        "gpt_oss_120b_lora",
    ):
        cfg = parse_args(["--config", f"train_configs/{name}.toml"])
        assert cfg.model.name == "gpt_oss"
    big = parse_args(["--config", "train_configs/gpt_oss_20b.toml"])
    assert (big.optimizer.lr, big.lr_scheduler.warmup_steps, big.lr_scheduler.decay_steps) == (
        3e-4,
        100,
        5000,
    )
    assert big.training.seq_len == 512 and big.training.mixed_precision_param == "bfloat16"
    assert big.optimizer.lr * big.lr_scheduler.min_lr_factor == pytest.approx(3e-5)


def test_mixture_sources_from_toml_and_command_line(tmp_path):
    f = tmp_path / "mix.toml"
    f.write_text(
        "[[data.sources]]\npath = 'web'\nweight = 0.7\n[[data.sources]]\npath = 'code'\nweight = 3\n"
    )
    cfg = parse_args(["--config", str(f)])
    assert [(s.path, s.weight) for s in cfg.data.sources] == [("web", 0.7), ("code", 3.0)]
    cfg = parse_args(["--data.sources=/d/web:0.7,/d/c:de:2,/d/plain"])
    assert [(s.path, s.weight) for s in cfg.data.sources] == [
        ("/d/web", 0.7),
        ("/d/c:de", 2.0),
        ("/d/plain", 1.0),
    ]


@pytest.mark.parametrize(
    "toml, argv, match",
    [
        ("[training]\nstesp = 3\n", [], "did you mean 'steps'"),
        ("[trainig]\nsteps = 3\n", [], "did you mean 'training'"),
        ("[training]\nsteps = 'three'\n", [], "training.steps must be int"),
        ("[training]\nsteps = 3.5\n", [], "training.steps must be int"),
        ("[checkpoint]\nenable = 1\n", [], "checkpoint.enable must be bool"),
        ("[[data.sources]]\npath = 'a'\nwieght = 1\n", [], r"unknown key data.sources\[0\].wieght.*'weight'"),
        ("[data]\nsources = 3\n", [], "data.sources must be a list"),
        ("", ["--training.steps=x"], "training.steps must be int"),
        ("", ["--training.stepz=3"], "did you mean 'steps'"),
        ("", ["stray"], "unexpected argument"),
        ("", ["--training.steps"], "needs a value"),
        ("", ["--checkpoint.enable=maybe"], "checkpoint.enable must be bool"),
    ],
)
def test_bad_config(tmp_path, toml, argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(["--config", write(tmp_path, toml)] + argv)


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        parse_args(["--config", str(tmp_path / "nope.toml")])
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_args(["--config", write(tmp_path, "[training\nsteps = 3")])


def test_model_args_table_sets_any_model_field(tmp_path):
    from gptoss_titan.config import model_args

    f = write(
        tmp_path, "[model]\nflavor = 'debug'\n[model.args]\nn_layers = 2\ndim = 128\nrope_theta = 10000\n"
    )
    cfg = parse_args(["--config", f, "--model.args.num_experts=4", "--model.args.top_k=1"])
    assert cfg.model.args == {"n_layers": 2, "dim": 128, "rope_theta": 10000.0, "num_experts": 4, "top_k": 1}
    a = model_args(cfg)
    assert (a.n_layers, a.dim, a.num_experts, a.top_k, a.vocab_size) == (2, 128, 4, 1, 201088)
    assert cfg.to_dict()["model"]["args"]["n_layers"] == 2  # recorded in the run's config.json


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--model.args.n_layres=2"], "unknown key model.args.n_layres .* did you mean 'n_layers'"),
        (["--model.args.n_layers=two"], "model.args.n_layers must be int, got 'two'"),
        (["--model.args=3"], "model.args is a table"),
    ],
)
def test_bad_model_args(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(["--data.dataset=kjv", *argv])


UNDOCUMENTED = {"beta1", "beta2", "eps"}  # AdamW's own names


def test_help_lists_every_option():
    text = help_text()
    cfg = JobConfig()
    for section, fields in cfg.to_dict().items():
        for key in fields:
            assert f"--{section}.{key}=" in text
    assert "peak learning rate" in text
    # every option carries its one-line doc (a formatter that wraps a long line would drop it)
    import dataclasses

    from gptoss_titan.config.loading import _field_comments

    for section in dataclasses.fields(cfg):
        cls = type(getattr(cfg, section.name))
        docs = _field_comments(cls)
        missing = [
            f.name for f in dataclasses.fields(cls) if f.name not in docs and f.name not in UNDOCUMENTED
        ]
        assert not missing, (section.name, missing)


def test_the_config_check_loads_no_model():
    """run_train.sh's launcher checks the config before any worker starts: that check reads
    ModelArgs and FLAVORS without importing the transformer, DTensor or sympy (0.65 s of every
    launch), and `gptoss_titan.model.Transformer` still resolves on first use."""
    code = (
        "import sys\n"
        "from gptoss_titan.config import check_before_launch\n"
        "check_before_launch(['--config', 'train_configs/debug_model.toml'])\n"
        "heavy = [m for m in sys.modules if m.startswith(('torch.distributed.tensor', 'sympy', 'gptoss_titan.model.model'))]\n"
        "assert not heavy, heavy\n"
        "from gptoss_titan.model import Transformer\n"
        "assert Transformer.__module__ == 'gptoss_titan.model.model'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
