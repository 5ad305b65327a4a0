import torch

from gptoss_titan.model import FLAVORS, Transformer

SPEC = {"20b": (20_914_757_184, 3_608_307_264), "120b": (116_829_156_672, 5_132_849_472)}


def test_counts_match_spec():
    for name, (total, active) in SPEC.items():
        assert FLAVORS[name].num_params() == total
        assert FLAVORS[name].num_active_params() == active


def test_spec_breakdown_20b():
    a = FLAVORS["20b"]
    assert (
        a.num_active_params() == 24 * (26_550_144 + 5_760 + 92_192 + 4 * 24_891_840) + 201_088 * 2_880 + 2_880
    )


def test_counts_equal_meta_model():
    for name in ("20b", "120b", "debug", "bench"):
        args = FLAVORS[name]
        with torch.device("meta"):
            m = Transformer(args)
        assert sum(p.numel() for p in m.parameters()) == args.num_params(), name
        E, K = args.num_experts, args.top_k
        experts = sum(p.numel() for n, p in m.named_parameters() if ".moe.experts." in n)
        embed = m.tok_embeddings.weight.numel()
        assert args.num_active_params() == args.num_params() - embed - experts * (E - K) // E, name


def test_layer_types_start_sliding():
    a = FLAVORS["20b"]
    assert [a.is_sliding(i) for i in range(4)] == [True, False, True, False]


def test_flops_are_window_aware():
    a = FLAVORS["20b"]
    # a sliding layer sees at most 128 keys: at T = 128 every layer is the same, beyond it sliding is cheaper
    assert a.avg_visible_keys(4096, 0) < a.avg_visible_keys(4096, 1)
    assert a.avg_visible_keys(128, 0) == a.avg_visible_keys(128, 1) == 129 / 2
    assert a.avg_visible_keys(4096, 0) == (128 * 129 / 2 + (4096 - 128) * 128) / 4096
    # 6 x the matmul weights of one token, counted from the model itself: every weight matrix except
    # the embedding (biases are not matmuls), experts scaled by K / E
    with torch.device("meta"):
        m = Transformer(a)
    w = sum(
        p.numel() * (a.top_k / a.num_experts if "experts.w_" in n else 1)
        for n, p in m.named_parameters()
        if (n.endswith(".weight") and p.dim() == 2 or "experts.w_" in n) and "tok_embeddings" not in n
    )
    dense = 6 * w
    assert dense > 6 * a.vocab_size * a.dim  # the lm_head is in
    f = a.flops_per_token(4096)
    attn = 12 * 64 * 64 * (12 * a.avg_visible_keys(4096, 0) + 12 * a.avg_visible_keys(4096, 1))
    assert f == dense + attn
    assert a.flops_per_token(8192) - a.flops_per_token(4096) < 12 * 64 * 64 * 24 * 4096 / 2
