"""model.balanced_routing: the capacity-limited top-k (balanced_routing.py) and the router's
fallback to it in training (moe.py Router)."""

import pytest
import torch

from gptoss_titan.model.balanced_routing import balanced_topk
from gptoss_titan.model.moe import Router

from ..conftest import tiny_args


def collapsed(M: int, E: int, seed: int = 0) -> torch.Tensor:
    """Scores whose common part (spread 5 across experts) dwarfs the tokens' own (0.01): a plain
    top-k sends every token to the same experts."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, E, generator=g) * 0.01 + torch.randn(E, generator=g) * 5


def loads(idx: torch.Tensor, E: int) -> torch.Tensor:
    return torch.bincount(idx.reshape(-1), minlength=E)


@pytest.mark.parametrize("M,E,k", [(1024, 8, 2), (1000, 32, 4), (512, 16, 1)])
def test_a_collapsed_batch_is_spread_within_capacity(M, E, k):
    s = collapsed(M, E)
    assert loads(s.topk(k).indices, E).max() == M  # plain: k experts take every token
    idx = balanced_topk(s, k)
    cap = -(-M * k // E)
    assert idx.shape == (M, k) and (idx.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts each
    assert loads(idx, E).max() <= cap and loads(idx, E).sum() == M * k
    # the tokens that keep the common favourite are the ones that score it highest
    best = s.mean(0).argmax()
    holders = (idx == best).any(-1).nonzero().squeeze(-1)
    assert set(holders.tolist()) == set(s[:, best].topk(cap).indices.tolist())
    torch.testing.assert_close(balanced_topk(s, k), idx, rtol=0, atol=0)  # deterministic


def test_tokens_keep_their_own_choice_when_it_fits():
    """Random scores (already about balanced): most tokens get their plain top-k, loads stay within
    a few percent of the capacity (a token whose missing experts are full takes one past it)."""
    M, E, k = 4096, 16, 2
    s = torch.randn(M, E, generator=torch.Generator().manual_seed(1))
    idx = balanced_topk(s, k)
    same = (idx.sort(-1).values == s.topk(k).indices.sort(-1).values).all(-1).float().mean()
    assert same > 0.85
    assert loads(idx, E).max() <= 1.05 * M * k / E
    # the choices within capacity come first, best first
    first = s.gather(-1, idx)
    assert ((first[:, 0] >= first[:, 1]) | (loads(idx, E).max() > M * k / E)).float().mean() > 0.95


def test_compiles_without_graph_breaks():
    s = collapsed(256, 8)
    compiled = torch.compile(balanced_topk, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(s, 2), balanced_topk(s, 2), rtol=0, atol=0)


def gated_router(threshold: float) -> Router:
    """4 experts, top-2, a gate that prefers experts 0 and 1 for every token."""
    router = Router(tiny_args(load_balance_bias=True, balanced_routing=threshold))
    with torch.no_grad():
        router.gate.weight.normal_(0, 0.01)
        router.gate.bias.copy_(torch.tensor([3.0, 2.0, 0.0, -1.0]))
        router.expert_bias.zero_()
        router.choice_counts.zero_()
    return router


def test_router_falls_back_only_in_training_and_past_the_threshold():
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    router = gated_router(1.5)
    plain_w, plain_idx, logits = router.eval()(x)
    assert loads(plain_idx, 4).tolist() == [64, 64, 0, 0]  # eval: gpt-oss's top-k, nothing counted
    assert router.choice_counts.tolist() == [0] * 5
    w, idx, _ = router.train()(x)
    # training: 2x the mean > 1.5, so the balanced assignment (with only 4 experts a few tokens
    # find every expert they lack full and take one anyway)
    assert loads(idx, 4).max() <= 1.25 * 32 and loads(idx, 4).min() >= 0.75 * 32
    torch.testing.assert_close(w, torch.softmax(logits.gather(-1, idx), -1))  # weights as ever
    assert router.choice_counts.tolist() == [64, 64, 0, 0, 1]  # the plain loads and one fallback
    with torch.no_grad():  # a bias that evens out the plain choice: the router keeps it as it is
        router.expert_bias.copy_(torch.tensor([-3.0, -2.0, 0.0, 1.0]))
        router.gate.weight.normal_(0, 1.0)
    router.choice_counts.zero_()
    w, idx, _ = router(x)
    plain = torch.topk(router.gate(x) + router.expert_bias, 2).indices
    assert loads(plain, 4).max() <= 1.5 * 32
    torch.testing.assert_close(idx, plain, rtol=0, atol=0)
    assert router.choice_counts[-1] == 0


def test_router_without_the_option_has_no_tally():
    router = Router(tiny_args(load_balance_bias=True))
    assert router.balanced_routing == 0 and not hasattr(router, "choice_counts")
    assert "choice_counts" not in router.state_dict()
    assert "choice_counts" not in gated_router(1.3).state_dict()  # a tally, never saved


def test_model_args_reject_a_threshold_below_one_or_without_the_bias():
    with pytest.raises(ValueError, match="balanced_routing = 0.5 must be 0"):
        tiny_args(load_balance_bias=True, balanced_routing=0.5)
    with pytest.raises(ValueError, match="with load_balance_bias on"):
        tiny_args(balanced_routing=1.3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("E,k", [(32, 4), (128, 4)])
def test_same_choice_on_cuda_and_its_cost(E, k):
    """20b's and 120b's expert counts, 8,192 tokens of a collapsed batch: CUDA chooses what the CPU
    does (ties aside: distinct random scores), and the time per routed batch is printed for the notes."""
    s = collapsed(8192, E)
    want = balanced_topk(s, k)
    got = balanced_topk(s.cuda(), k)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        balanced_topk(s.cuda(), k)
    end.record()
    torch.cuda.synchronize()
    print(f"balanced_topk on CUDA, 8192 tokens, {E} experts, top-{k}: {start.elapsed_time(end) / 10:.2f} ms")
