"""Export (export.py). MXFP4 in the release layout: transformers loads it (dequantizing on CPU) and
computes our logits with the same quantize-dequantize applied; importing it gives back the same
experts. Every export of the o200k_harmony vocabulary carries a tokenizer equal to tiktoken's."""

import json
import os
import subprocess
import sys

import pytest
import torch

from gptoss_titan.interop.export import RELEASE_QUANTIZATION
from gptoss_titan.model.hf import name_pairs
from gptoss_titan.model.mxfp4 import quantize_dequantize

from ..conftest import ROOT
from ..helpers.checkpoint import weights
from ..helpers.convert import convert, ours_from

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def test_mxfp4_export(trained, tmp_path):
    from safetensors import safe_open

    from gptoss_titan.checkpoint import read_model_args

    step = trained / "run/checkpoint/step-3"
    args = read_model_args(step)
    out = tmp_path / "mx"
    r = convert("--checkpoint", str(step), "--output", str(out), "--quantize", "mxfp4", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "tensors" in r.stderr and "MB/s" in r.stderr and "done" in r.stderr  # progress lines
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == RELEASE_QUANTIZATION

    # the release's names, dtypes and shapes; the expected size
    names = {}
    for f in out.glob("*.safetensors"):
        assert os.stat(f).st_mode & 0o044, "exports must be readable by others"
        with safe_open(str(f), "pt") as h:
            names.update(
                {k: (h.get_slice(k).get_dtype(), tuple(h.get_slice(k).get_shape())) for k in h.keys()}
            )
    E, H, Inter = args.num_experts, args.dim, args.moe_inter_dim
    p = "model.layers.0.mlp.experts."
    assert names[p + "gate_up_proj_blocks"] == ("U8", (E, 2 * Inter, H // 32, 16))
    assert names[p + "gate_up_proj_scales"] == ("U8", (E, 2 * Inter, H // 32))
    assert names[p + "down_proj_blocks"] == ("U8", (E, H, Inter // 32, 16))
    assert p + "gate_up_proj" not in names and names[p + "gate_up_proj_bias"][0] == "F32"
    expected = 0
    for _, hf, shape in name_pairs(args):
        n = torch.Size(shape).numel()
        expected += n // 2 + n // 32 if hf.endswith(("gate_up_proj", "down_proj")) else 4 * n
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert abs(size - expected) / expected < 0.05, (size, expected)

    # import: the experts come back as exactly the quantize-dequantized originals
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/convert_hf_to_dcp.py"),
            "--hf",
            str(out),
            "--output",
            str(tmp_path / "back"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    orig, back = weights(step), weights(tmp_path / "back")
    for k, v in orig.items():
        want = quantize_dequantize(v) if k.endswith(("w_gate_up", "w_down")) else v
        assert torch.equal(back[k], want), k

    # transformers (dequantizing on CPU) equals our model with the same quantize-dequantize
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", dtype=torch.float32
    )
    hf.eval()
    ours = ours_from(step)
    with torch.no_grad():
        for layer in ours.layers:
            layer.moe.experts.w_gate_up.copy_(quantize_dequantize(layer.moe.experts.w_gate_up))
            layer.moe.experts.w_down.copy_(quantize_dequantize(layer.moe.experts.w_down))
        torch.manual_seed(0)
        for n in (7, 150):
            x = torch.randint(0, 199990, (1, n))
            diff = (ours(x) - hf(x).logits.float()).abs().max().item()
            assert diff <= 1e-4, diff


def test_sft_then_mxfp4_export_generates_in_transformers(tmp_path):
    """The fine-tune-and-serve loop on the debug flavor: a few SFT steps on the bundled chat set with
    MXFP4-aware training, an MXFP4 export, and transformers generates from the folder."""
    from ..conftest import run_ok

    run_ok(
        [
            sys.executable,
            "-m",
            "gptoss_titan.train",
            "--config",
            str(ROOT / "train_configs/sft_debug.toml"),
            f"--job.dump_folder={tmp_path / 'sft'}",
            "--training.steps=3",
            "--checkpoint.interval=3",
            "--validation.freq=3",
            "--validation.steps=1",
            "--training.mxfp4_qat=true",
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows) and all(r["target_tokens"] > 0 for r in rows if "loss" in r)
    out = tmp_path / "hf"
    r = convert("--checkpoint", str(tmp_path / "sft"), "--output", str(out), "--quantize", "mxfp4", "--quiet")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    import argparse

    from gptoss_titan.infer.sample import prompt_ids

    question = "What does Genesis 1:1 say?"
    ours = prompt_ids(argparse.Namespace(prompt=question, prompt_file=None, chat=True))
    tok = transformers.AutoTokenizer.from_pretrained(out)  # the folder's own tokenizer and chat template
    chat = [{"role": "user", "content": question}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False) == ours
    ids = torch.tensor([ours])
    gen = hf.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6, eos_token_id=None)
    assert gen.shape == (1, ids.shape[1] + 6)


def test_export_carries_a_tokenizer_equal_to_tiktoken(trained_hf):
    """AutoTokenizer loads the exported folder alone and encodes / decodes like tiktoken's
    o200k_harmony, special and reserved tokens included; one name per id (llama.cpp needs it)."""
    from gptoss_titan.data.tokenizer import get_tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(trained_hf)
    enc = get_tokenizer()
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, len(tok)) == (
        200002,
        199999,
        199998,
        201088,
    )
    vocab = json.loads((trained_hf / "tokenizer.json").read_text())
    ids = [t["id"] for t in vocab["added_tokens"]]
    assert ids == list(range(199998, 201088)) and len({t["content"] for t in vocab["added_tokens"]}) == len(
        ids
    )
    texts = [
        "Once upon a time",
        "<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Yo<|return|>",
        "  héllo\n\n\tworld 12345 日本語 🙂 don't I'M 'll",
        "<|reserved_200500|>x<|endofprompt|><|endoftext|> end <|reserved_201087|>",
        "a" * 60 + " \u00a0\u2003 mixed\r\n lines   ",
        "1234567890 3.14159 $$$ ==> // In the beginning God created the heaven and the earth.",
    ]
    for t in texts:
        ids = enc.encode(t, allowed_special="all")
        assert tok.encode(t, add_special_tokens=False) == ids, t
        assert tok.decode(ids) == t
    assert os.stat(trained_hf / "tokenizer.json").st_mode & 0o044
