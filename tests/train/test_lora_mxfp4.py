"""LoRA runs on an MXFP4-resident base (lora.base_format = "mxfp4"): the experts read as stored from
a Hugging Face MXFP4 folder (or quantized from a full-precision one) straight into the sharded
model, no converted copy in the run folder; the same training as the base dequantized to fp32;
FSDP 2 x EP 2 equal to one process and resumed bit for bit; bad settings one line, exit 2."""

import pytest
import torch

from gptoss_titan.model import FLAVORS
from gptoss_titan.model.lora import is_adapter
from gptoss_titan.train import main

from ..conftest import losses, python_cmd, run_ok
from ..helpers.checkpoint import weights
from ..helpers.convert import convert
from .test_lora import base_run, lora_argv

MXFP4 = ("--lora.base_format=mxfp4", "--checkpoint.initial_load_format=hf")
SGD_LIKE = ("--optimizer.eps=1", "--optimizer.lr=0.5")  # see test_lora.test_two_processes_equal_one


@pytest.fixture(scope="module")
def hf_bases(module_tmp):
    """(the base exported with MXFP4 experts, the same base exported in fp32); the other weights
    fp32 in both."""
    step = base_run(module_tmp, "base_for_mxfp4")
    out = module_tmp / "hf_mxfp4", module_tmp / "hf_fp32"
    for folder, extra in zip(out, (("--quantize", "mxfp4"), ())):
        r = convert("--checkpoint", step, "--output", str(folder), "--dtype", "float32", *extra)
        assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_the_resident_base_trains_as_its_dequantized_copy(hf_bases, module_tmp):
    """The MXFP4 folder as a resident base (uint8 experts) and as a base dequantized to fp32
    parameters: the same losses and adapters (up to the backward's rounding); no hf-import copy is
    written; the base's record names the folder."""
    tmp, (mx, _) = module_tmp, hf_bases
    assert main(lora_argv(tmp, str(mx), "resident", *MXFP4, *SGD_LIKE)) == 0
    assert main(lora_argv(tmp, str(mx), "dequantized", "--checkpoint.initial_load_format=hf", *SGD_LIKE)) == 0
    assert losses(tmp / "resident") == pytest.approx(losses(tmp / "dequantized"), rel=1e-5)
    a, b = (weights(tmp / n / "checkpoint" / "step-4") for n in ("resident", "dequantized"))
    assert a.keys() == b.keys() and all(is_adapter(k) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    for run in ("resident", "dequantized"):
        assert not (tmp / run / "checkpoint" / "hf-import").exists()  # read in place, not converted


def test_a_full_precision_folder_is_quantized_at_load(hf_bases, module_tmp, capfd):
    """An fp32 folder as an MXFP4 base: its experts are quantized when read (logged), which gives
    the MXFP4 export's values, so the run equals the one on the MXFP4 folder."""
    tmp, (_, fp32) = module_tmp, hf_bases
    assert main(lora_argv(tmp, str(fp32), "from_fp32", *MXFP4, *SGD_LIKE, "--training.steps=2")) == 0
    n_layers = FLAVORS["bench"].n_layers
    assert f"quantized {2 * n_layers} expert tensors" in capfd.readouterr().out  # (gate_up, down) per layer
    ref = tmp / "resident"
    if not (ref / "metrics.jsonl").is_file():
        pytest.skip("needs test_the_resident_base_trains_as_its_dequantized_copy's run")
    assert losses(tmp / "from_fp32") == losses(ref)[:2]


@pytest.mark.slow
def test_fsdp_by_ep_equals_one_process_and_resumes_bitwise(hf_bases, module_tmp):
    """FSDP 2 x EP 2 on the resident base (blocks and scales split by expert; the experts' FSDP
    degree is 1 here): the losses and adapters of one process (<= 1e-5); stopped at step 2 and
    resumed, bit for bit."""
    tmp, (mx, _) = module_tmp, hf_bases
    one = tmp / "resident"
    if not (one / "checkpoint" / "step-4").is_dir():
        assert main(lora_argv(tmp, str(mx), one.name, *MXFP4, *SGD_LIKE)) == 0

    def run(name, *extra):
        argv = lora_argv(
            tmp, str(mx), name, *MXFP4, *SGD_LIKE, "--parallelism.expert_parallel_degree=2", *extra
        )
        run_ok(python_cmd(2, "-m", "gptoss_titan.train", *argv))

    run("mx_ep")
    assert losses(tmp / "mx_ep") == pytest.approx(losses(one), rel=1e-5)
    a, b = weights(one / "checkpoint" / "step-4"), weights(tmp / "mx_ep" / "checkpoint" / "step-4")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    run("mx_ep_resumed", "--training.steps=2")
    run("mx_ep_resumed")
    assert losses(tmp / "mx_ep_resumed") == losses(tmp / "mx_ep")
    c = weights(tmp / "mx_ep_resumed" / "checkpoint" / "step-4")
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_bad_mxfp4_base_settings_are_one_line(hf_bases, module_tmp, capsys):
    tmp, (mx, _) = module_tmp, hf_bases
    dcp_base = str(tmp / "base_for_mxfp4" / "checkpoint" / "step-2")
    cases = [
        ("bad1", (dcp_base, "--lora.base_format=mxfp4"), "checkpoint.initial_load_format = 'hf'"),
        ("bad2", (str(mx), *MXFP4, "--model.args.moe_inter_dim=48"), "moe_inter_dim to be a multiple of 32"),
    ]
    for name, (base, *extra), want in cases:
        assert main(lora_argv(tmp, base, name, *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], err
        assert not (tmp / name).exists()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tensor_parallel_degree=2", "data_parallel_shard_degree=2"])
def test_tensor_parallel_and_fsdp_equal_one_process(hf_bases, module_tmp, layout):
    """TP 2 on the resident base (the gate-up blocks split by output rows, the down blocks by their
    32-value input blocks) and FSDP 2 (the uint8 blocks and scales sharded by expert and gathered
    per layer): the losses and adapters of one process (<= 1e-5)."""
    tmp, (mx, _) = module_tmp, hf_bases
    one = tmp / "resident"
    if not (one / "checkpoint" / "step-4").is_dir():
        assert main(lora_argv(tmp, str(mx), one.name, *MXFP4, *SGD_LIKE)) == 0
    name = "mx_" + layout.split("_")[0]
    argv = lora_argv(tmp, str(mx), name, *MXFP4, *SGD_LIKE, f"--parallelism.{layout}")
    run_ok(python_cmd(2, "-m", "gptoss_titan.train", *argv))
    assert losses(tmp / name) == pytest.approx(losses(one), rel=1e-5)
    a, b = weights(one / "checkpoint" / "step-4"), weights(tmp / name / "checkpoint" / "step-4")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_merge_export_reads_the_hugging_face_base_in_place(hf_bases, module_tmp):
    """--lora merge of a run on a Hugging Face MXFP4 base (no converted copy anywhere): the merged
    weights are the base's (MXFP4 experts dequantized) plus the adapters' update; the others as
    stored. The base's record names the folder."""
    import json

    from gptoss_titan.checkpoint.files import read_model_args
    from gptoss_titan.interop.convert import HFFolder
    from gptoss_titan.model.hf import name_pairs
    from gptoss_titan.model.lora import weight_delta

    tmp, (mx, _) = module_tmp, hf_bases
    if not (tmp / "resident" / "checkpoint" / "step-4").is_dir():
        assert main(lora_argv(tmp, str(mx), "resident", *MXFP4, *SGD_LIKE)) == 0
    step = tmp / "resident" / "checkpoint" / "step-4"
    assert json.loads((step / "lora_base.json").read_text())["path"] == str(mx.resolve())
    r = convert(
        "--checkpoint", str(step), "--output", str(tmp / "merged"), "--lora", "merge", "--dtype", "float32"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    adapters = weights(step)
    base, merged = HFFolder(str(mx)), HFFolder(str(tmp / "merged"))
    args = read_model_args(step)
    changed = 0
    for native, hf, _ in name_pairs(args):
        delta = weight_delta(native, adapters, 8 / 4)  # alpha / rank of ADAPTERS
        want = base.load(hf).float()
        if delta is not None:
            want, changed = want + delta, changed + 1
        torch.testing.assert_close(merged.load(hf), want, rtol=1e-6, atol=1e-7, msg=hf)
    assert changed == 2 * args.n_layers + 5 * args.n_layers  # experts (2) + q, k, v, o, router per layer


@pytest.mark.slow
def test_a_damaged_base_is_one_line_on_every_rank_through_run_train_sh(hf_bases, module_tmp):
    """A safetensors shard of the base cut short: both ranks stop at the load with one line and
    exit 2 through the launcher, none waits for the other."""
    import shutil

    from ..conftest import one_line_error, run_train_sh

    tmp, (mx, _) = module_tmp, hf_bases
    broken = tmp / "hf_broken"
    shutil.copytree(mx, broken)
    shard = max(broken.glob("*.safetensors"), key=lambda f: f.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    argv = lora_argv(tmp, str(broken), "on_broken", *MXFP4, "--training.steps=2", "--metrics.sample_freq=0")
    r = run_train_sh({"NGPU": "2"}, *argv, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    err = one_line_error(r.stderr)
    assert "is damaged or unreadable" in err and shard.name in err, err
