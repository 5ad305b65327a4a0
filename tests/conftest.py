import os

import pytest
import torch

from gptoss_titan.model import ModelArgs, Transformer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_args(**kw) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=256, num_experts=4,
                top_k=2, moe_inter_dim=32, sliding_window=8, max_seq_len=128)
    base.update(kw)
    return ModelArgs(**base)


def build(args: ModelArgs, seed: int = 0) -> Transformer:
    with torch.device("meta"):
        m = Transformer(args)
    m.to_empty(device="cpu")
    torch.manual_seed(seed)
    m.init_weights()
    return m


@pytest.fixture
def tiny():
    return tiny_args()
