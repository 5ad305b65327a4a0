"""ModelArgs: every number that defines a gpt-oss model, the named flavors, and counts.

The counts are functions of the args (never stored) and are tested against a real meta-device
model and against the published 20b/120b numbers (20,914,757,184 and 116,829,156,672 parameters;
3,608,307,264 and 5,132,849,472 active).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .tokens import VOCAB_SIZE

# Fields that shape only how a run trains (no weight, no saved state): a checkpoint, an export or
# a sampling config may differ in them.
TRAINING_ONLY_FIELDS = ("balanced_routing",)
# model.expert_kernel's choices: "auto" is resolved by moe.py's resolve_expert_kernel, the others are
# what GroupedExperts.kernel holds (here, where the config check reads them without the model)
EXPERT_KERNELS = ("auto", "loop", "batched", "grouped")


@dataclass
class ModelArgs:
    dim: int = 2880  # hidden size H (residual stream width)
    n_layers: int = 24  # number of transformer blocks
    n_heads: int = 64  # query heads N
    n_kv_heads: int = 8  # key/value heads (GQA); query head h reads kv head h // (N / n_kv_heads)
    head_dim: int = 64  # D, per-head width (not dim / n_heads in gpt-oss)
    vocab_size: int = VOCAB_SIZE  # V, o200k_harmony's 201088
    num_experts: int = 32  # E, experts per MoE layer
    top_k: int = 4  # K, experts per token
    moe_inter_dim: int = 2880  # I, expert intermediate size (gate_up is 2I wide, interleaved)
    sliding_window: int = 128  # keys visible on sliding layers (the token itself included)
    max_seq_len: int = 131072  # longest context the model accepts (RoPE tables are this long)
    rope_theta: float = 150000.0  # RoPE base
    rope_factor: float = 32.0  # YaRN scaling factor
    rope_beta_fast: float = 32.0  # YaRN high-frequency boundary (rotations)
    rope_beta_slow: float = 1.0  # YaRN low-frequency boundary (rotations)
    rope_original_seq_len: int = 4096  # YaRN original_max_position_embeddings
    norm_eps: float = 1e-5  # RMSNorm epsilon
    swiglu_limit: float = 7.0  # clamp of gate (above) and up (both sides)
    swiglu_alpha: float = 1.702  # sigmoid gain of the gated activation
    init_std: float = 0.02  # std of the normal init (HF's initializer_range)
    # Auxiliary-loss-free load balancing: a per-expert bias added to router logits for the top-k
    # choice only (not the weights), nudged after each step toward uniform load. Off = gpt-oss.
    load_balance_bias: bool = False
    # Training only, with the bias: while a layer's plain top-k puts more than this many times the
    # mean load on one expert, its batches are routed by a capacity-limited assignment instead
    # (balanced_routing.py: the first steps of a from-scratch run). 0 = off = gpt-oss.
    balanced_routing: float = 0.0

    def __post_init__(self) -> None:
        """Shape rules, each error naming the fields and their values (one line)."""
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "num_experts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 1")
        for name in ("moe_inter_dim", "sliding_window", "max_seq_len", "rope_original_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 1")
        for name in ("rope_theta", "norm_eps", "swiglu_limit", "swiglu_alpha", "init_std", "rope_beta_slow"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be > 0")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads = {self.n_heads} must be a multiple of n_kv_heads = {self.n_kv_heads} "
                "(each key/value head serves n_heads / n_kv_heads query heads)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim = {self.head_dim} must be even (RoPE rotates pairs)")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k = {self.top_k} must be between 1 and num_experts = {self.num_experts}")
        if self.balanced_routing and not (self.balanced_routing >= 1 and self.load_balance_bias):
            raise ValueError(
                f"balanced_routing = {self.balanced_routing} must be 0 (off) or >= 1 (a max / mean load) "
                "with load_balance_bias on (the bias learns the routing that takes over from it)"
            )
        if self.rope_factor < 1:
            raise ValueError(f"rope_factor = {self.rope_factor} must be >= 1 (1 = plain RoPE, no YaRN)")
        if not self.rope_beta_fast > self.rope_beta_slow:
            raise ValueError(
                f"rope_beta_fast = {self.rope_beta_fast} must be above rope_beta_slow = {self.rope_beta_slow}"
            )

    # ----- structure -------------------------------------------------------------------------
    def is_sliding(self, layer_id: int) -> bool:
        """gpt-oss alternates attention types starting with sliding: layer 0 sliding, 1 full, ..."""
        return layer_id % 2 == 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    # ----- counts ----------------------------------------------------------------------------
    def _attn_params(self) -> int:
        q = self.n_heads * self.head_dim
        kv = self.n_kv_heads * self.head_dim
        return (self.dim * q + q) + 2 * (self.dim * kv + kv) + (q * self.dim + self.dim) + self.n_heads

    def _expert_params(self) -> int:
        two_i = 2 * self.moe_inter_dim
        return (self.dim * two_i + two_i) + (self.moe_inter_dim * self.dim + self.dim)

    def _router_params(self) -> int:
        return self.num_experts * self.dim + self.num_experts

    def num_params(self) -> int:
        """Every parameter: embedding, blocks (attention, 2 norms, router, all experts), final norm, lm_head."""
        block = (
            self._attn_params()
            + 2 * self.dim
            + self._router_params()
            + self.num_experts * self._expert_params()
        )
        return self.n_layers * block + 2 * self.vocab_size * self.dim + self.dim

    def num_active_params(self) -> int:
        """Parameters one token uses: all but the embedding and the E - K experts it is not routed to."""
        block = (
            self._attn_params() + 2 * self.dim + self._router_params() + self.top_k * self._expert_params()
        )
        return self.n_layers * block + self.vocab_size * self.dim + self.dim

    def avg_visible_keys(self, seq_len: int, layer_id: int) -> float:
        """Mean number of keys a query attends to (causal; window-limited on sliding layers)."""
        w = self.sliding_window if self.is_sliding(layer_id) else seq_len
        w = min(w, seq_len)
        # positions 0..T-1 see min(i + 1, w) keys
        total = w * (w + 1) / 2 + (seq_len - w) * w
        return total / seq_len

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at sequence length seq_len.

        6 x the matmul weights a token uses (q/k/v/o, router, its K experts, lm_head; the embedding
        is a lookup, biases and norms are not matmuls) plus attention: QK^T and PV cost 2 x 2 x N x D
        per visible key forward, x3 for forward + backward. Window-aware: sliding layers count at
        most `sliding_window` keys per query.
        """
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        expert = 3 * self.dim * self.moe_inter_dim  # gate_up [H, 2I] + down [I, H]
        per_layer = 2 * self.dim * q + 2 * self.dim * kv + self.dim * self.num_experts + self.top_k * expert
        dense = 6 * (self.n_layers * per_layer + self.vocab_size * self.dim)
        qd = self.n_heads * self.head_dim
        attn = sum(12 * qd * self.avg_visible_keys(seq_len, i) for i in range(self.n_layers))
        return float(dense + attn)

    def yarn_mscale(self) -> float:
        """Attention scaling YaRN applies to cos and sin: 0.1 ln(factor) + 1 (1 when factor <= 1)."""
        return 1.0 if self.rope_factor <= 1 else 0.1 * math.log(self.rope_factor) + 1.0


FLAVORS: dict[str, ModelArgs] = {
    # The real 201088-token vocabulary on a tiny body: a 4 x 256 training step takes ~1 s on 2 CPU cores.
    "debug": ModelArgs(
        dim=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        vocab_size=VOCAB_SIZE,
        num_experts=8,
        top_k=2,
        moe_inter_dim=128,
        sliding_window=128,
        max_seq_len=4096,
    ),
    # The performance benchmark's flavor (see benchmarks/).
    "bench": ModelArgs(
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=2,
        head_dim=32,
        vocab_size=8192,
        num_experts=8,
        top_k=2,
        moe_inter_dim=256,
        sliding_window=64,
        max_seq_len=4096,
    ),
    "20b": ModelArgs(
        dim=2880,
        n_layers=24,
        n_heads=64,
        n_kv_heads=8,
        head_dim=64,
        vocab_size=VOCAB_SIZE,
        num_experts=32,
        top_k=4,
        moe_inter_dim=2880,
        sliding_window=128,
        max_seq_len=131072,
    ),
    "120b": ModelArgs(
        dim=2880,
        n_layers=36,
        n_heads=64,
        n_kv_heads=8,
        head_dim=64,
        vocab_size=VOCAB_SIZE,
        num_experts=128,
        top_k=4,
        moe_inter_dim=2880,
        sliding_window=128,
        max_seq_len=131072,
    ),
}
