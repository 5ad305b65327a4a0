"""LoRA adapters and PEFT, both ways (interop/peft.py, interop/lora_export.py): our adapter folder,
loaded by the released peft onto transformers' model of the base export, gives our logits; an
adapter made by peft, imported, gives peft's logits; the merged export equals the unmerged adapter."""

import json

import pytest
import torch

from gptoss_titan.checkpoint import read_model_args
from gptoss_titan.interop.lora_export import read_peft_adapter
from gptoss_titan.model import Transformer
from gptoss_titan.model.lora import LoRASpec, add_lora, sites_of
from gptoss_titan.train import main

from ..conftest import two_at_a_time
from ..helpers.checkpoint import weights
from ..helpers.convert import convert
from ..helpers.training import argv_for

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
TARGETS = ("attention", "experts", "router")


def ours_with_adapters(base_step, adapters: dict, spec: LoRASpec) -> Transformer:
    args = read_model_args(base_step)
    with torch.device("meta"):
        m = Transformer(args)
    add_lora(m, spec)
    m.to_empty(device="cpu")
    m.init_buffers()
    m.load_state_dict({**weights(base_step), **adapters}, strict=False)
    return m.eval()


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def trained(module_tmp):
    """A bench-flavor base (2 steps) exported to HF in fp32, and 3 LoRA steps on it (rank 4, every
    target, lr high enough that every B is far from zero)."""
    tmp = module_tmp
    common = ("--checkpoint.enable=true", "--validation.enable=false", "--training.steps=2")
    assert main(argv_for(tmp, f"--job.dump_folder={tmp / 'base'}", *common)) == 0
    base = tmp / "base" / "checkpoint" / "step-2"
    lora = ("--lora.rank=4", "--lora.alpha=8", f"--lora.targets={','.join(TARGETS)}", "--optimizer.lr=3e-2",
            f"--checkpoint.initial_load_path={base}")  # fmt: skip
    assert main(argv_for(tmp, f"--job.dump_folder={tmp / 'lora'}", *common, *lora)) == 0
    r = convert("--checkpoint", str(base), "--output", str(tmp / "base_hf"), "--dtype", "float32", "--quiet")
    assert r.returncode == 0, r.stderr
    return tmp, base, tmp / "lora" / "checkpoint" / "step-2"


def test_our_adapter_loads_in_peft_and_the_merged_export_equals_it(trained):
    tmp, base, step = trained
    r = convert("--checkpoint", str(step), "--output", str(tmp / "adapter"), "--lora", "adapter", "--quiet")
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and config["r"] == 4
    assert config["target_parameters"] == [
        "mlp.experts.gate_up_proj",
        "mlp.experts.down_proj",
        "mlp.router.weight",
    ]
    r = convert(
        "--checkpoint", str(step), "--output", str(tmp / "merged"), "--lora", "merge", "--dtype", "float32"
    )
    assert r.returncode == 0, r.stderr
    r = convert(
        "--checkpoint", str(step), "--output", str(tmp / "merged4"), "--lora", "merge", "--quantize", "mxfp4"
    )
    assert r.returncode == 0, r.stderr
    index = json.loads((tmp / "merged4" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in index  # the merged experts, requantized

    adapters = weights(step)
    ours = ours_with_adapters(base, adapters, LoRASpec(4, 8.0, 0.0, TARGETS))
    with_peft = peft.PeftModel.from_pretrained(hf_model(tmp / "base_hf"), str(tmp / "adapter")).eval()
    merged = hf_model(tmp / "merged")
    tokens = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(tokens)
        base_only = hf_model(tmp / "base_hf")(tokens).logits
        assert (want - base_only).abs().max() > 1e-2  # the adapters matter
        for got in (with_peft(tokens).logits, merged(tokens).logits):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "modules,params",
    [
        (
            ["q_proj", "k_proj", "v_proj", "o_proj"],
            ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.router.weight"],
        ),
        ([], ["mlp.experts.gate_up_proj"]),  # one expert matrix: not nested in peft's keys
        ([], ["mlp.experts.down_proj"]),
    ],
    ids=["all", "gate_up_only", "down_only"],
)
def test_a_peft_made_adapter_imports_with_peft_logits(trained, tmp_path, modules, params):
    """Imported, then exported again: peft's logits both ways (fp32, 1e-5)."""
    tmp, base, _ = trained
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=modules or None,
        target_parameters=params,
        init_lora_weights=False,  # random A and B: the adapter changes the logits
    )
    made = peft.get_peft_model(hf_model(tmp / "base_hf"), cfg).eval()
    made.save_pretrained(str(tmp_path / "made"))
    lora, adapters = read_peft_adapter(str(tmp_path / "made"), read_model_args(base))
    assert lora == {"rank": 4, "alpha": 16.0, "dropout": 0.0}
    ours = ours_with_adapters(base, adapters, LoRASpec(4, 16.0, 0.0, (), sites=sites_of(adapters)))
    tokens = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = made(tokens).logits
        torch.testing.assert_close(ours(tokens), want, rtol=1e-5, atol=1e-5)
    # and back: our tensors in peft's names load into peft onto the base, with the same logits
    from safetensors.torch import save_file

    from gptoss_titan.interop.peft import adapter_config, to_peft

    back = tmp_path / "back"
    back.mkdir()
    save_file(to_peft(adapters), str(back / "adapter_model.safetensors"))
    n_layers = read_model_args(base).n_layers
    (back / "adapter_config.json").write_text(json.dumps(adapter_config(adapters, 4, 16.0, n_layers, None)))
    again = peft.PeftModel.from_pretrained(hf_model(tmp / "base_hf"), str(back)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, want, rtol=1e-5, atol=1e-5)


def test_lora_flags_on_the_wrong_checkpoint_are_one_line(trained, tmp_path):
    tmp, base, step = trained
    r = convert("--checkpoint", str(step), "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "holds LoRA adapters only; pass --lora adapter" in r.stderr
    r = convert("--checkpoint", str(base), "--output", str(tmp_path / "o"), "--lora", "adapter")
    assert r.returncode == 2 and "holds no LoRA adapters" in r.stderr and not (tmp_path / "o").exists()


def test_sampling_with_the_adapter_unmerged_equals_the_merged_export(trained, tmp_path):
    """Greedy tokens from a LoRA checkpoint (its recorded base + adapters), from the base with
    --adapter FOLDER, on 2 processes, and from the merged export: all the same."""
    from ..helpers.sample import sample

    tmp, base, step = trained
    for name, extra in (
        ("adapter", ("--lora", "adapter")),
        ("merged", ("--lora", "merge", "--dtype", "float32")),
    ):
        if not (tmp / name).is_dir():
            assert convert("--checkpoint", str(step), "--output", str(tmp / name), *extra).returncode == 0
    prompt = ("--prompt", "In the end the man and the", "--max_new_tokens", "12")  # ids < 8192
    runs = {
        "checkpoint": (("--checkpoint", str(step)), 1),
        "adapter": (("--checkpoint", str(base), "--adapter", str(tmp / "adapter")), 1),
        "adapter_2proc": (("--checkpoint", str(base), "--adapter", str(tmp / "adapter")), 2),
        "merged": (("--hf", str(tmp / "merged")), 1),
    }
    calls = [
        (*where, *prompt, "--output_json", str(tmp_path / f"{name}.json"), nproc)
        for name, (where, nproc) in runs.items()
    ]
    calls += [("--checkpoint", str(base), "--adapter", str(tmp_path), *prompt, 1),
              ("--checkpoint", str(base), "--prompt", "the woman said", "--max_new_tokens", "2", 1)]  # fmt: skip
    results = two_at_a_time(lambda call: sample(*call[:-1], nproc=call[-1]), calls)
    tokens = {}
    for name, r in zip(runs, results):
        assert r.returncode == 0, r.stderr[-3000:]
        tokens[name] = json.loads((tmp_path / f"{name}.json").read_text())["tokens"]
    assert tokens["checkpoint"] == tokens["adapter"] == tokens["adapter_2proc"] == tokens["merged"]
    assert results[-2].returncode == 2 and "is not a PEFT adapter folder" in results[-2].stderr
    r = results[-1]
    assert r.returncode == 2 and "token id 8773, beyond the model's vocab_size 8192" in r.stderr


def test_training_starts_from_a_peft_adapter_and_exports_it_back(trained, tmp_path):
    """lora.initial_adapter: a peft-made adapter on q, v and the experts' down_proj of layer 1 only
    (what [lora] targets cannot say) is where the run's adapters start and sit: one step at lr 1e-9
    moves them by about 1e-9; the run's adapter export names exactly those places; a rank that
    does not fit is one line, exit 2, nothing written."""
    tmp, base, _ = trained
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                          target_parameters=["model.layers.1.mlp.experts.down_proj"], init_lora_weights=False)  # fmt: skip
    peft.get_peft_model(hf_model(tmp / "base_hf"), cfg).save_pretrained(str(tmp_path / "made"))
    _, imported = read_peft_adapter(str(tmp_path / "made"), read_model_args(base))
    assert sorted(k for k in imported if "experts" in k) == [
        "layers.1.moe.experts.lora_down_A",
        "layers.1.moe.experts.lora_down_B",
    ]

    def run(*extra):
        return main(argv_for(tmp, f"--job.dump_folder={tmp_path / 'run'}", "--training.steps=1", "--checkpoint.enable=true",
                             "--validation.enable=false", f"--checkpoint.initial_load_path={base}", "--optimizer.lr=1e-9",
                             f"--lora.initial_adapter={tmp_path / 'made'}", "--lora.alpha=16", *extra))  # fmt: skip

    assert run("--lora.rank=8") == 2 and not (tmp_path / "run").exists()
    assert run("--lora.rank=4") == 0
    trained_adapters = weights(tmp_path / "run" / "checkpoint" / "step-1")
    assert trained_adapters.keys() == imported.keys()
    for k, v in imported.items():
        torch.testing.assert_close(trained_adapters[k], v, rtol=0, atol=1e-8)
    r = convert(
        "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "back"), "--lora", "adapter"
    )
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["model.layers.1.mlp.experts.down_proj"]
    assert sorted(config["target_modules"]) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(read_model_args(base).n_layers) for p in "qv"
    )
    peft.PeftModel.from_pretrained(hf_model(tmp / "base_hf"), str(tmp_path / "back"))  # loads as is
