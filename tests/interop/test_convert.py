"""DCP -> Hugging Face export: transformers loads it and computes our logits; errors are one line."""

import json
import logging
import subprocess
import sys

import pytest
import torch

from gptoss_titan.infer.generate import generate
from gptoss_titan.model import Transformer
from gptoss_titan.train import main

from ..conftest import BIG_ARGS, ROOT, peak_rss, synthetic_data, two_at_a_time, write_random_hf
from ..helpers.checkpoint import weights
from ..helpers.convert import convert, import_, ours_from, quantize_folder

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)
pytestmark = pytest.mark.slow


def test_transformers_loads_export_and_matches(trained, trained_hf):
    out = trained_hf  # exported with --max-shard-size 40MB
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", dtype=torch.float32
    )
    hf.eval()
    ours = ours_from(trained / "run/checkpoint/step-3")
    torch.manual_seed(0)
    prompts = [torch.randint(0, 199990, (1, n)) for n in (5, 40, 150)]  # 150 > the 128-token window
    with torch.no_grad():
        for p in prompts:
            diff = (ours(p) - hf(p).logits).abs().max().item()
            assert diff <= 1e-5, diff
        p = prompts[1]
        ref = hf.generate(p, max_new_tokens=32, do_sample=False, min_new_tokens=32, eos_token_id=None)
        got = generate(ours, p, 32)
        assert torch.equal(ref, got)


def test_bf16_export_is_the_default(trained):
    out = trained / "hf16"
    assert (
        convert("--checkpoint", str(trained / "run/checkpoint/step-3"), "--output", str(out)).returncode == 0
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["model_type"] == "gpt_oss"
    from safetensors import safe_open

    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())


def test_export_errors(trained, tmp_path):
    cases = [
        (["--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "o")], "does not exist"),
        (["--checkpoint", str(tmp_path), "--output", str(tmp_path / "o")], "no complete checkpoint"),
        (["--checkpoint", str(trained / "run"), "--output", str(tmp_path / "o"), "--dtype", "fp8"], "fp8"),
        (
            [
                "--checkpoint",
                str(trained / "run"),
                "--output",
                str(tmp_path / "o"),
                "--max-shard-size",
                "big",
            ],
            "big",
        ),
        (["--checkpoint", str(trained / "run"), "--output", str(trained / "run")], "already exists"),
    ]
    results = two_at_a_time(lambda case: convert(*case[0]), cases)
    for r, (_, match) in zip(results, cases):
        assert r.returncode == 2 and r.stderr.startswith("error:") and match in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_round_trip_is_bit_exact(trained):
    hf_dir, back = trained / "rt_hf", trained / "rt_dcp"
    assert (
        convert(
            "--checkpoint", str(trained / "run"), "--output", str(hf_dir), "--dtype", "float32"
        ).returncode
        == 0
    )
    r = import_("--hf", str(hf_dir), "--output", str(back))
    assert r.returncode == 0, r.stderr
    a, b = weights(trained / "run/checkpoint/step-3"), weights(back)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_trainer_starts_from_hf_folder(trained, trained_hf, tmp_path, capsys):
    hf_dir = trained_hf
    argv = [
        "--model.flavor=debug",
        f"--data.dataset_path={trained / 'data'}",
        f"--job.dump_folder={tmp_path / 'ft'}",
        "--training.steps=1",
        "--training.seq_len=32",
        "--training.local_batch_size=2",
        "--validation.enable=false",
        "--checkpoint.enable=true",
        "--checkpoint.initial_load_format=hf",
        f"--checkpoint.initial_load_path={hf_dir}",
        "--optimizer.lr=1e-9",
    ]
    assert main(argv) == 0
    a, b = weights(trained / "run/checkpoint/step-3"), weights(tmp_path / "ft/checkpoint/step-1")
    # one step at lr 1e-9 from the imported weights: equal to ~1e-8
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-7
    capsys.readouterr()
    small = synthetic_data(tmp_path / "d8192")  # ids < 8192 so that the data fits the bench flavor
    bad = [
        a for a in argv if not a.startswith(("--model.flavor", "--job.dump_folder", "--data.dataset_path"))
    ]
    assert (
        main(
            bad
            + ["--model.flavor=bench", f"--job.dump_folder={tmp_path / 'x'}", f"--data.dataset_path={small}"]
        )
        == 2
    )
    assert "has model dim = 64 but the config gives 256" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # with aux-loss-free balancing on: the HF folder has no expert biases, they start at zero
    assert (
        main(
            argv[:2]
            + [f"--job.dump_folder={tmp_path / 'lbb'}"]
            + argv[3:]
            + ["--model.load_balance_bias=true"]
        )
        == 0
    )
    assert "expert-bias buffers are not in" in capsys.readouterr().out


def test_mxfp4_import_matches_transformers_dequantization(trained, trained_hf):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from gptoss_titan.model.mxfp4 import FP4_VALUES

    src = trained_hf
    q = trained / "mxfp4"
    packed = quantize_folder(src, q)
    r = import_("--hf", str(q), "--output", str(trained / "mxfp4_dcp"))
    assert r.returncode == 0, r.stderr
    got = weights(trained / "mxfp4_dcp")
    lut = torch.tensor(FP4_VALUES)
    for hf_name, (blocks, scales) in packed.items():
        layer = hf_name.split(".")[2]
        native = f"layers.{layer}.moe.experts." + ("w_gate_up" if "gate_up" in hf_name else "w_down")
        theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out] like ours
        torch.testing.assert_close(got[native], theirs, rtol=0, atol=0)
        # reference decode of one block: byte j -> elements 2j (low nibble), 2j+1 (high nibble)
        b, s = blocks[0, 0, 0], int(scales[0, 0, 0]) - 127
        ref = torch.stack([lut[(b & 15).long()], lut[(b >> 4).long()]], -1).reshape(32) * 2.0**s
        torch.testing.assert_close(got[native][0, :32, 0], ref, rtol=0, atol=0)


def test_import_errors(trained, trained_hf, tmp_path):
    src = trained_hf
    empty, broken = tmp_path / "empty", tmp_path / "broken"
    for d in (empty, broken):
        d.mkdir()
        (d / "config.json").write_text((src / "config.json").read_text())
    cases = [
        (["--hf", str(tmp_path / "nope"), "--output", str(tmp_path / "o")], "does not exist"),
        (["--hf", str(empty), "--output", str(tmp_path / "o")], "no model.safetensors.index.json"),
        (["--hf", str(src), "--output", str(src)], "already exists"),
    ]
    from safetensors.torch import load_file, save_file

    tensors = {}
    for f in src.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    tensors["model.layers.0.self_attn.sinks"] = torch.zeros(3)
    del tensors["lm_head.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    cases.append((["--hf", str(broken), "--output", str(tmp_path / "o")], "lm_head.weight' is missing"))
    del tensors["model.layers.0.self_attn.sinks"]
    results = two_at_a_time(lambda case: import_(*case[0]), cases)
    for r, (_, match) in zip(results, cases):
        assert r.returncode == 2 and match in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_export_streams_under_memory_budget(tmp_path):
    """A ~400 MB checkpoint exports with peak RSS well below its size (measured in subprocesses)."""
    args = BIG_ARGS
    assert args.num_params() * 4 > 350e6
    hf = write_random_hf(tmp_path / "big_hf", args)

    baseline = peak_rss([sys.executable, "-c", "import gptoss_titan.interop.convert, safetensors.torch"])
    imported = peak_rss(
        [
            sys.executable,
            str(ROOT / "scripts/convert_hf_to_dcp.py"),
            "--hf",
            str(hf),
            "--output",
            str(tmp_path / "dcp"),
        ]
    )
    exported = peak_rss(
        [
            sys.executable,
            str(ROOT / "scripts/convert_dcp_to_safetensors.py"),
            "--checkpoint",
            str(tmp_path / "dcp"),
            "--output",
            str(tmp_path / "out"),
            "--dtype",
            "float32",
            "--max-shard-size",
            "50MB",
        ]
    )
    exported_mx = peak_rss(
        [
            sys.executable,
            str(ROOT / "scripts/convert_dcp_to_safetensors.py"),
            "--checkpoint",
            str(tmp_path / "dcp"),
            "--output",
            str(tmp_path / "out_mx"),
            "--quantize",
            "mxfp4",
            "--max-shard-size",
            "50MB",
        ]
    )
    # budget: half the 400 MB checkpoint above the interpreter's own footprint (measured: export ~+90 MB,
    # one 50 MB shard plus the largest 33 MB tensor and their copies; import ~+120 MB)
    budget = baseline + 200e6
    assert exported < budget, (exported - baseline) / 1e6
    assert exported_mx < budget, (exported_mx - baseline) / 1e6  # MXFP4: encoded expert by expert
    assert imported < budget, (imported - baseline) / 1e6
    assert len(list((tmp_path / "out").glob("*.safetensors"))) >= 8


def every_rank_of_4(check: str, tmp_path) -> None:
    """Run this module's `check`(folder, rank) for each rank of a fake world of 4, one process each
    (DTensor caches assume a process's rank never changes), on a random fp32 folder and its MXFP4
    version; two processes at a time (mostly imports: they overlap on 2 cores)."""
    from ..conftest import tiny_args, write_random_hf

    src = write_random_hf(tmp_path / "hf", tiny_args(dim=64, n_layers=2, num_experts=4))
    quantize_folder(src, tmp_path / "mxfp4")

    def one(folder_rank: tuple) -> subprocess.CompletedProcess:
        code = f"from tests.interop.test_convert import {check} as f; f({str(folder_rank[0])!r}, {folder_rank[1]})"
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)

    for r in two_at_a_time(
        one, [(folder, rank) for folder in (src, tmp_path / "mxfp4") for rank in range(4)]
    ):
        assert r.returncode == 0, r.stderr[-3000:]


def check_rank_reads_its_part(folder_path: str, rank: int) -> None:
    """load_hf_into on rank `rank` of a fake world of 4 (one rank per process: DTensor caches assume
    a process's rank never changes): every local shard equals that part of the whole tensor."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from gptoss_titan.interop.convert import HFFolder, args_from_hf_config, load_hf_into
    from gptoss_titan.model.hf import name_pairs
    from gptoss_titan.runtime.compat import fake_process_group

    folder = HFFolder(folder_path)
    args = args_from_hf_config(folder.config)
    fake_process_group(4, rank)
    mesh = init_device_mesh("cpu", (4,))
    model = Transformer(args)
    placement = {}
    for native, _, _ in name_pairs(args):
        mod_name, _, pname = native.rpartition(".")
        mod = model.get_submodule(mod_name)
        placement[native] = [Shard(1) if "experts.w_" in native else Shard(0)]
        dt = distribute_tensor(
            torch.empty_like(getattr(mod, pname)), mesh, placement[native], src_data_rank=None
        )
        setattr(mod, pname, nn.Parameter(dt))
    load_hf_into(model, folder, args)
    params = dict(model.named_parameters())
    for native, hf, _ in name_pairs(args):
        want = distribute_tensor(folder.load(hf), mesh, placement[native], src_data_rank=None).to_local()
        assert torch.equal(params[native].to_local(), want), (folder_path, rank, native)
    dist.destroy_process_group()


def test_each_rank_reads_only_its_part_of_a_hf_folder(tmp_path):
    """The sampler's loader (load_hf_into) on each rank of a fake world of 4: plain tensors split by
    rows, MXFP4 experts split inside (dim 1, 16 columns per rank: half a 32-value block)."""
    every_rank_of_4("check_rank_reads_its_part", tmp_path)


def check_resident_rank_reads_its_part(folder_path: str, rank: int) -> None:
    """load_hf_into on rank `rank` of a fake world of 4 into an MXFP4-resident model (a LoRA base):
    the experts' uint8 blocks and scales split inside each expert (dim 1, the output rows, as FSDP
    splits experts when a rank holds fewer than one), the rest by rows; every local shard equals
    that part of the folder's blocks and scales (an MXFP4 folder) or of its experts quantized (an
    fp32 folder)."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from gptoss_titan.interop.convert import HFFolder, args_from_hf_config, load_hf_into
    from gptoss_titan.model.hf import name_pairs
    from gptoss_titan.model.mxfp4 import quantize_mxfp4
    from gptoss_titan.runtime.compat import fake_process_group

    folder = HFFolder(folder_path)
    args = args_from_hf_config(folder.config)
    fake_process_group(4, rank)
    mesh = init_device_mesh("cpu", (4,))
    model = Transformer(args)
    for block in model.blocks():
        block.moe.experts.freeze_as_mxfp4()
    placement = {}
    for name, p in list(model.named_parameters()):
        mod_name, _, pname = name.rpartition(".")
        placement[name] = [Shard(1) if pname.endswith(("_blocks", "_scales")) else Shard(0)]
        dt = distribute_tensor(torch.empty_like(p), mesh, placement[name], src_data_rank=None)
        model.get_submodule(mod_name).register_parameter(pname, nn.Parameter(dt, requires_grad=False))
    load_hf_into(model, folder, args)
    params = dict(model.named_parameters())
    for native, hf, _ in name_pairs(args):
        if f"{native}_blocks" in params:
            if f"{hf}_blocks" in folder.weight_map:
                full = {
                    "blocks": folder.load_raw(f"{hf}_blocks", None, None),
                    "scales": folder.load_raw(f"{hf}_scales", None, None),
                }
            else:
                full = dict(zip(("blocks", "scales"), quantize_mxfp4(folder.load(hf))))
            for part, value in full.items():
                want = distribute_tensor(
                    value, mesh, placement[f"{native}_{part}"], src_data_rank=None
                ).to_local()
                assert torch.equal(params[f"{native}_{part}"].to_local(), want), (
                    folder_path,
                    rank,
                    native,
                    part,
                )
        else:
            want = distribute_tensor(folder.load(hf), mesh, placement[native], src_data_rank=None).to_local()
            assert torch.equal(params[native].to_local(), want), (folder_path, rank, native)
    dist.destroy_process_group()


def test_each_rank_reads_its_part_into_an_mxfp4_resident_model(tmp_path):
    every_rank_of_4("check_resident_rank_reads_its_part", tmp_path)


def test_load_hf_into_refuses_a_parameter_no_tensor_fills(tmp_path):
    """The model is built with uninitialized memory when a base loads: a parameter that no Hugging
    Face tensor maps to is an error, not garbage weights (LoRA adapters are left alone)."""
    from torch import nn

    from gptoss_titan.interop.convert import HFFolder, load_hf_into
    from gptoss_titan.model.lora import LoRASpec, add_lora

    from ..conftest import tiny_args, write_random_hf

    args = tiny_args(dim=64, n_layers=2, num_experts=4)
    folder = HFFolder(str(write_random_hf(tmp_path / "hf", args)))
    model = Transformer(args)
    add_lora(model, LoRASpec(4, 8.0, 0.0, ("attention",)))
    load_hf_into(model, folder, args)  # every base weight filled; the adapters are not the folder's
    model.layers[0].attention.register_parameter("extra", nn.Parameter(torch.empty(3)))
    with pytest.raises(
        RuntimeError, match=r"no Hugging Face tensor for the parameters \['layers.0.attention.extra'\]"
    ):
        load_hf_into(model, folder, args)
