"""The generation command line (sample.py) on a trained checkpoint and its Hugging Face export."""

import json
import subprocess

import pytest
import torch

from .conftest import ROOT, python_cmd
from .test_convert import convert

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def sample(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(
        python_cmd(nproc, "-m", "gptoss_titan.sample", *args),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


LONG_PROMPT = "And God said, Let there be light: and there was light. " * 9  # ~126 tokens: past the window


def test_sample_cli_greedy_equals_transformers(trained, tmp_path):
    out = tmp_path / "tokens.json"
    r = sample(
        "--checkpoint",
        str(trained / "run"),
        "--prompt",
        LONG_PROMPT,
        "--max_new_tokens",
        "24",
        "--output_json",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert len(res["prompt"]) + 24 > 128 and len(res["tokens"][0]) == 24
    hf_dir = trained / "hf32"
    if not hf_dir.exists():
        assert (
            convert(
                "--checkpoint", str(trained / "run"), "--output", str(hf_dir), "--dtype", "float32"
            ).returncode
            == 0
        )
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, attn_implementation="eager", dtype=torch.float32
    )
    ref = hf.generate(
        torch.tensor([res["prompt"]]),
        max_new_tokens=24,
        min_new_tokens=24,
        do_sample=False,
        eos_token_id=None,
    )
    assert ref[0, len(res["prompt"]) :].tolist() == res["tokens"][0]
    # the same from the exported Hugging Face folder
    r2 = sample(
        "--hf",
        str(hf_dir),
        "--prompt",
        LONG_PROMPT,
        "--max_new_tokens",
        "24",
        "--output_json",
        str(tmp_path / "hf.json"),
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert json.loads((tmp_path / "hf.json").read_text())["tokens"] == res["tokens"]


def test_sample_two_processes_equal_one(trained, tmp_path):
    common = [
        "--checkpoint",
        str(trained / "run"),
        "--prompt",
        "In the beginning",
        "--max_new_tokens",
        "12",
        "--temperature",
        "0.9",
        "--top_p",
        "0.95",
        "--seed",
        "5",
        "--num_samples",
        "2",
    ]
    r1 = sample(*common, "--output_json", str(tmp_path / "one.json"))
    r2 = sample(*common, "--output_json", str(tmp_path / "two.json"), nproc=2)
    assert r1.returncode == 0 and r2.returncode == 0, r2.stdout[-2000:] + r2.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text())["tokens"] for f in ("one.json", "two.json"))
    assert one == two and one[0] != one[1]  # seeded sampling: reproducible, and the two samples differ


def test_sample_errors(trained, tmp_path):
    ck = str(trained / "run")
    cases = [
        (["--checkpoint", ck, "--prompt", "hello world " * 3000], "exceeds the model's context of 4096"),
        (["--checkpoint", ck, "--prompt", ""], "prompt is empty"),
        (["--checkpoint", str(tmp_path / "none"), "--prompt", "hi"], "does not exist"),
        (["--checkpoint", ck, "--prompt", "hi", "--temperature", "-1"], "--temperature -1.0 must be >= 0"),
        (["--checkpoint", ck, "--prompt", "hi", "--top_p", "0"], "--top_p 0.0 must be in (0, 1]"),
        (["--checkpoint", ck, "--prompt", "hi", "--top_p", "1.5"], "--top_p 1.5 must be in (0, 1]"),
    ]
    for argv, match in cases:
        r = sample(*argv)
        assert r.returncode == 2 and match in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]


def test_chat_prompt_uses_harmony_tokens():
    import argparse

    from gptoss_titan.sample import prompt_ids

    ids = prompt_ids(argparse.Namespace(prompt="Hi", prompt_file=None, chat=True))
    assert ids == [200006, 1428, 200008, 12194, 200007, 200006, 173781]
