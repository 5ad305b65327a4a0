"""The generation command line (sample.py) on a trained checkpoint and its Hugging Face export."""

import json
import subprocess

import pytest
import torch

from ..conftest import ROOT, python_cmd, run_ok, two_at_a_time
from ..helpers.sample import sample

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def one_and_two_processes(tmp_path, *argv: str) -> list[list[int]]:
    """The sampled tokens of 1 and of 2 processes (asserted equal), from the same arguments."""
    r1 = sample(*argv, "--output_json", str(tmp_path / "one.json"))
    r2 = sample(*argv, "--output_json", str(tmp_path / "two.json"), nproc=2)
    assert r1.returncode == 0 and r2.returncode == 0, (
        r1.stderr[-2000:] + r2.stdout[-2000:] + r2.stderr[-3000:]
    )
    one, two = (json.loads((tmp_path / f).read_text())["tokens"] for f in ("one.json", "two.json"))
    assert one == two
    return one


LONG_PROMPT = "And God said, Let there be light: and there was light. " * 9  # ~126 tokens: past the window


def test_sample_cli_greedy_equals_transformers(trained, trained_hf, tmp_path):
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
    hf_dir = trained_hf
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
    one = one_and_two_processes(tmp_path, *common)
    assert one[0] != one[1]  # seeded sampling: reproducible, and the two samples differ


def test_sample_errors(trained, tmp_path):
    ck = str(trained / "run")
    cases = [
        (["--checkpoint", ck, "--prompt", "hello world " * 3000], "exceeds the model's context of 4096"),
        (["--checkpoint", ck, "--prompt", ""], "prompt is empty"),
        (["--checkpoint", str(tmp_path / "none"), "--prompt", "hi"], "does not exist"),
        (["--checkpoint", ck, "--prompt", "hi", "--temperature", "-1"], "--temperature -1.0 must be >= 0"),
        (["--checkpoint", ck, "--prompt", "hi", "--top_p", "0"], "--top_p 0.0 must be in (0, 1]"),
        (["--checkpoint", ck, "--prompt", "hi", "--top_p", "1.5"], "--top_p 1.5 must be in (0, 1]"),
        (
            ["--checkpoint", ck, "--prompt_file", str(tmp_path / "latin1.txt")],
            "latin1.txt' is not valid UTF-8 (byte 3",
        ),
        (
            ["--checkpoint", ck, "--prompt", "hi", "--output_json", str(tmp_path / "no" / "o.json")],
            "cannot be written",
        ),
    ]
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    results = two_at_a_time(lambda case: sample(*case[0]), cases)
    for r, (_, match) in zip(results, cases):
        assert r.returncode == 2 and match in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]


def test_chat_prompt_is_harmonys_and_replies_are_parsed():
    """--chat renders the prompt with openai-harmony (system message, user, <|start|>assistant) and
    prints a reply's channels separately."""
    import argparse

    from gptoss_titan.data.chat import harmony
    from gptoss_titan.infer.sample import chat_reply, prompt_ids

    ids = prompt_ids(argparse.Namespace(prompt="Hi", prompt_file=None, chat=True))
    enc = harmony()
    assert ids[-7:] == [200006, 1428, 200008, 12194, 200007, 200006, 173781]  # user "Hi", then assistant
    assert enc.decode_utf8(ids).startswith("<|start|>system<|message|>")
    reply = enc.encode(
        "<|channel|>analysis<|message|>Greet back.<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|return|>",
        allowed_special="all",
    )
    assert chat_reply(reply) == "[analysis] Greet back.\n[final] Hello!"
    assert chat_reply(enc.encode("just text", allowed_special="all")).startswith("[not a harmony reply")


def test_sample_from_hf_and_mxfp4_two_processes_equal_one(trained, trained_hf, tmp_path):
    """Each rank reads only its part of every safetensors tensor (MXFP4 experts included) and the
    sharded model samples exactly what one process samples."""
    from ..helpers.convert import quantize_folder

    hf = trained_hf
    q = tmp_path / "mxfp4"
    quantize_folder(hf, q)
    for folder in (hf, q):
        common = [
            "--hf",
            str(folder),
            "--prompt",
            "In the beginning",
            "--max_new_tokens",
            "8",
            "--temperature",
            "0.9",
            "--seed",
            "3",
            "--num_samples",
            "2",
        ]
        one_and_two_processes(tmp_path, *common)


def test_load_in_bf16(trained):
    """--dtype bfloat16 (the GPU default) holds the weights in bf16 (not an fp32 copy cast later)
    and computes the fp32 model's logits to bf16 precision."""
    import argparse

    from gptoss_titan.infer.sample import load_model

    logits = {}
    tok = torch.tensor([[791, 3581, 382, 290, 10922]])
    for dtype in ("float32", "bfloat16"):
        a = argparse.Namespace(
            hf=None, checkpoint=str(trained / "run"), config=None, dtype=dtype, num_samples=1, adapter=None
        )
        m = load_model(a)
        assert {p.dtype for p in m.parameters()} == {getattr(torch, dtype)}
        with torch.no_grad():
            logits[dtype] = m(tok).float()
    scale = logits["float32"].abs().max()
    assert (logits["bfloat16"] - logits["float32"]).abs().max() < 0.05 * scale


def test_two_process_sample_loads_half_the_weights_per_rank(tmp_path):
    """From a ~430 MB fp32 Hugging Face folder, each of 2 ranks' peak memory grows by about its half
    of the weights while loading, not by the whole model (measured 0.70-0.77 x the folder; the
    loader before reading per-rank slices: 1.6 x, a full fp32 state on every rank)."""
    from ..conftest import BIG_ARGS, write_random_hf

    hf = write_random_hf(tmp_path / "big_hf", BIG_ARGS)
    size_mib = sum(p.stat().st_size for p in hf.glob("*.safetensors")) / 2**20
    out = tmp_path / "rss.json"
    run_ok(python_cmd(2, str(ROOT / "tests" / "sample_load_rss.py"), str(hf), str(out)))
    grown = json.loads(out.read_text())["grown_mib"]
    assert 0.4 * size_mib < grown < 0.9 * size_mib, (grown, size_mib)


def test_memory_plan_20b_and_120b():
    """Counted on the meta device with the real FSDP sharding (fake process group): bf16 20b fits
    one 80 GB GPU with a full 131k-token cache; 120b needs 4 x 80 GB or 2 x 141 GB (H200)."""

    def plan(flavor, ngpu):
        r = subprocess.run(
            [str(ROOT / "scripts" / "generate.sh"), "--flavor", flavor, "--plan", "--dtype", "bfloat16"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**__import__("os").environ, "NGPU": str(ngpu)},
        )
        assert r.returncode == 0, r.stderr[-2000:]
        return float(r.stdout.split("= ")[-1].split()[0])  # GiB per rank

    gb80, gb141 = 80e9 / 2**30, 141e9 / 2**30
    assert plan("20b", 1) < gb80
    assert plan("120b", 2) > gb80 and plan("120b", 2) < gb141 and plan("120b", 4) < gb80


def test_config_shape_must_match_the_weights():
    """--config is used: its model shape is checked against the checkpoint's (one line)."""
    from gptoss_titan.infer.sample import SampleError, check_config_shape
    from gptoss_titan.model import FLAVORS

    config = str(ROOT / "train_configs" / "debug_model.toml")
    check_config_shape(config, FLAVORS["debug"])
    check_config_shape(None, FLAVORS["bench"])
    with pytest.raises(
        SampleError, match=r"--config .*debug_model.toml' gives model dim = 64 but the weights have 2880"
    ):
        check_config_shape(config, FLAVORS["20b"])


def test_output_json_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    from gptoss_titan.infer.sample import SampleError, write_json

    write_json(tmp_path / "o.json", {"tokens": [[1, 2]]})
    assert json.loads((tmp_path / "o.json").read_text()) == {"tokens": [[1, 2]]}

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(SampleError, match=r"'.*o.json' could not be written \(no space left on device"):
        write_json(tmp_path / "o.json", {"tokens": []})
    monkeypatch.undo()
    assert json.loads((tmp_path / "o.json").read_text()) == {"tokens": [[1, 2]]}  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.json"]
