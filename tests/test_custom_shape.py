"""A model shape of one's own ([model.args] over a flavor): it trains, logs its size, exports to a
folder transformers loads with equal logits, imports back bit for bit, and samples."""

import json
import sys

import pytest
import torch

from gptoss_titan.config import parse_args
from gptoss_titan.config.validation import model_args

from .conftest import run_ok, synthetic_data
from .helpers.checkpoint import weights
from .helpers.convert import convert, import_, ours_from
from .helpers.sample import sample

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

SHAPE = {  # odd layer count, 6 experts top-3, 6 heads over 3 kv heads, no YaRN, an 8-token window
    "n_layers": 3,
    "dim": 32,
    "n_heads": 6,
    "n_kv_heads": 3,
    "head_dim": 8,
    "num_experts": 6,
    "top_k": 3,
    "moe_inter_dim": 32,
    "sliding_window": 8,
    "max_seq_len": 256,
    "rope_theta": 10000.0,
    "rope_factor": 1.0,
}


def test_custom_shape_trains_exports_imports_and_samples(tmp_path):
    data = synthetic_data(tmp_path / "data", vocab=201088)
    argv = [
        "--model.flavor=debug",
        *(f"--model.args.{k}={v}" for k, v in SHAPE.items()),
        f"--data.dataset_path={data}",
        f"--job.dump_folder={tmp_path / 'run'}",
        "--training.steps=2",
        "--training.seq_len=32",
        "--training.local_batch_size=2",
        "--validation.enable=false",
        "--checkpoint.enable=true",
        "--checkpoint.interval=2",
        "--metrics.sample_freq=0",
    ]
    args = model_args(parse_args(argv))
    assert (args.n_layers, args.num_experts, args.top_k, args.dim) == (3, 6, 3, 32)
    run_ok([sys.executable, "-m", "gptoss_titan.train", *argv])
    first = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])
    assert (first["params"], first["active_params"]) == (args.num_params(), args.num_active_params())
    assert first["flops_per_token"] == args.flops_per_token(32)
    step = tmp_path / "run/checkpoint/step-2"
    ours = ours_from(step)
    assert sum(p.numel() for p in ours.parameters()) == args.num_params()

    hf_dir = tmp_path / "hf"
    r = convert("--checkpoint", str(step), "--output", str(hf_dir), "--dtype", "float32", "--quiet")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (3, 6, 3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, attn_implementation="eager", dtype=torch.float32
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for n in (3, 20):  # 20 > the 8-token window
            p = torch.randint(0, 199990, (1, n))
            assert (ours(p) - hf.eval()(p).logits).abs().max().item() <= 1e-5

    back = tmp_path / "back"
    r = import_("--hf", str(hf_dir), "--output", str(back))
    assert r.returncode == 0, r.stderr
    a, b = weights(step), weights(back)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    r = sample("--checkpoint", str(tmp_path / "run"), "--prompt", "In the beginning", "--max_new_tokens", "4")
    assert r.returncode == 0, r.stderr[-2000:]
