import pytest
import torch

from gptoss_titan.model import FLAVORS
from gptoss_titan.model.hf import MappingError, from_hf, hf_config, to_hf
from gptoss_titan.model.mxfp4 import FP4_VALUES, dequantize_mxfp4

from ..conftest import build, tiny_args


def test_hf_config_is_accepted_by_transformers():
    transformers = pytest.importorskip("transformers")
    for name in ("20b", "120b", "debug"):
        a = FLAVORS[name]
        d = hf_config(a)
        cfg = transformers.GptOssConfig(**d)
        assert cfg.model_type == "gpt_oss" and d["architectures"] == ["GptOssForCausalLM"]
        assert cfg.layer_types[:2] == ["sliding_attention", "full_attention"]
        assert cfg.rope_parameters["truncate"] is False and cfg.rope_parameters["rope_theta"] == 150000
        assert cfg.num_local_experts == a.num_experts and cfg.head_dim == a.head_dim
        assert d["eos_token_id"] == 200002 and d["pad_token_id"] == 199999
    small = hf_config(FLAVORS["bench"])
    assert small["eos_token_id"] < 8192 and small["pad_token_id"] < 8192


def test_mapping_checks_names_and_shapes():
    args = tiny_args()
    sd = build(args).state_dict()
    hf = to_hf(sd, args)
    assert "model.layers.1.mlp.experts.gate_up_proj" in hf and "lm_head.weight" in hf
    assert set(from_hf(hf, args)) == set(sd)
    bad = dict(hf)
    bad["model.layers.0.self_attn.sinks"] = torch.zeros(3)
    with pytest.raises(
        MappingError, match=r"model.layers.0.self_attn.sinks' has shape \[3\], expected \[4\]"
    ):
        from_hf(bad, args)
    del bad["lm_head.weight"]
    with pytest.raises(MappingError, match="lm_head.weight' is missing"):
        from_hf(bad, args)
    with pytest.raises(MappingError, match="unexpected tensor 'extra'"):
        to_hf({**sd, "extra": torch.zeros(1)}, args)


def test_native_only_bias_is_dropped_on_export():
    args = tiny_args(load_balance_bias=True)
    sd = build(args).state_dict()
    assert any("expert_bias" in k for k in sd)
    assert not any("expert_bias" in k for k in to_hf(sd, args))


def test_mxfp4_dequantize_matches_lut_decode():
    torch.manual_seed(0)
    E, out_dim, nb = 2, 3, 2
    blocks = torch.randint(0, 256, (E, out_dim, nb, 16), dtype=torch.uint8)
    scales = torch.randint(120, 134, (E, out_dim, nb), dtype=torch.uint8)
    got = dequantize_mxfp4(blocks, scales, torch.float32)
    assert got.shape == (E, nb * 32, out_dim)
    for e in range(E):
        for o in range(out_dim):
            for b in range(nb):
                for j in range(16):
                    byte = int(blocks[e, o, b, j])
                    s = 2.0 ** (int(scales[e, o, b]) - 127)
                    assert got[e, b * 32 + 2 * j, o] == FP4_VALUES[byte & 15] * s
                    assert got[e, b * 32 + 2 * j + 1, o] == FP4_VALUES[byte >> 4] * s
