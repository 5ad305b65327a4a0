"""The gpt-oss transformer, read from the parts to the whole.

Shape legend: B batch, T time, H hidden, N query heads, G kv heads, D head dim, V vocab,
E experts, L layers.

The model knows nothing about parallelism. It is built on the meta device (no memory), the
parallel passes are applied from the outside, then `to_empty(device)` and `init_weights()` set
every parameter and buffer, the RoPE tables included.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..runtime.dtypes import compute_dtype
from .args import ModelArgs
from .attention import attention_mask, decode_attention, position_mask, sink_attention, training_attention
from .documents import Documents, document_attention, document_masks
from .init import init_params
from .kv_cache import KVCache, LayerCache
from .local import local
from .logprobs import head_logits, logprobs_at
from .loss import fused_linear_cross_entropy
from .moe import EXPERT_KERNELS, MoE


class RMSNorm(nn.Module):
    """y = w * x * rsqrt(mean(x^2) + eps), computed in fp32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * y).to(x.dtype)


def yarn_inv_freq(args: ModelArgs) -> torch.Tensor:
    """[D/2] YaRN inverse frequencies (fp32): interpolate low frequencies, keep high ones.

    freq_i = theta^(2i/D); the ramp between `low` and `high` (in frequency index units, from the
    beta_fast / beta_slow rotation counts over the original context, not rounded) blends
    1/(factor freq_i) (below low ... interpolated) with 1/freq_i (extrapolated).
    """
    d, base = args.head_dim, args.rope_theta
    freq = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)  # [D/2]
    if args.rope_factor <= 1:
        return 1.0 / freq

    def dim_for(rotations: float) -> float:
        return d * math.log(args.rope_original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(dim_for(args.rope_beta_fast), 0.0), min(dim_for(args.rope_beta_slow), d - 1.0)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [D/2]
    return (1.0 / (args.rope_factor * freq)) * ramp + (1.0 / freq) * (1 - ramp)


def rope_tables(
    args: ModelArgs, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, D/2] in fp32, both multiplied by the YaRN mscale."""
    inv_freq = yarn_inv_freq(args).to(device)
    pos = torch.arange(args.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(pos, inv_freq)  # [S, D/2]
    m = args.yarn_mscale()
    return angles.cos() * m, angles.sin() * m


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D], cos/sin [T, D/2] (or [B, T, D/2], per row): rotate the halves
    (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    x1, x2 = x.chunk(2, dim=-1)
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D/2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    """GQA with q/k/v/o biases, YaRN RoPE, per-head sinks; sliding window on even layers."""

    def __init__(self, args: ModelArgs, sliding: bool):
        super().__init__()
        # heads computed here (a tensor-parallel pass leaves each process a share and sets these)
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.sliding_window if sliding else None
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=True)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=True)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=True)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=True)
        self.sinks = nn.Parameter(torch.empty(args.n_heads))  # [N] one logit per query head

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask=None,
        cache: LayerCache | None = None,
        positions: torch.Tensor | None = None,
        cache_empty: bool = True,
    ) -> torch.Tensor:
        """x [B, T, H], cos/sin [T, D/2] for these tokens' positions -> [B, T, H].

        mask: `attention_mask` for this layer's window and the batch shape (built outside compiled
        regions). With a cache, positions [T] are the tokens' absolute positions; their keys and
        values are stored, and the queries attend as in `_cached_attention`.
        """
        B, T, _ = x.shape
        # head counts from the shapes: a tensor-parallel pass leaves each process a share of the heads
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, N, T, D]
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, G, T, D]
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, G, T, D]
        sinks = local(self.sinks)  # [N]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(mask, Documents):
            out = document_attention(q, k, v, sinks, self.window, mask)  # [B, N, T, D]
        elif hasattr(mask, "attend"):  # a layout that attends itself (context parallelism's CPBatch)
            out = mask.attend(q, k, v, sinks, self.window)
        elif cache is None:
            out = training_attention(q, k, v, sinks, self.window, mask)  # [B, N, T, D]
        else:
            out = self._cached_attention(q, k, v, sinks, mask, cache, positions, cache_empty)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # [B, T, H]

    def _cached_attention(
        self, q, k, v, sinks, mask, cache: LayerCache, positions: torch.Tensor, cache_empty: bool
    ):
        """The prompt on an empty cache attends to its own keys with the training kernels; one new
        token attends to every slot (static shapes); several tokens on a filled cache attend to the
        slots plus their own keys. Keys outside the window or not yet written are masked by position."""
        if cache_empty:
            out = training_attention(q, k, v, sinks, self.window, mask)
            cache.write(k, v, positions)
        elif q.shape[2] == 1:
            cache.write(k, v, positions)
            allowed = position_mask(positions, cache.pos, self.window)  # [1, C]
            out = decode_attention(q, cache.k.to(q.dtype), cache.v.to(q.dtype), sinks, allowed)
        else:
            keys = torch.cat([cache.k.to(k.dtype), k], dim=2)  # [B, G, C + T, D]
            values = torch.cat([cache.v.to(v.dtype), v], dim=2)
            allowed = position_mask(positions, torch.cat([cache.pos, positions]), self.window)  # [T, C + T]
            out = sink_attention(q, keys, values, sinks, self.window, allowed)
            cache.write(k, v, positions)
        return out


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, sliding=args.is_sliding(layer_id))
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.moe = MoE(args)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask=None,
        need_probs: bool = False,
        cache: LayerCache | None = None,
        positions: torch.Tensor | None = None,
        cache_empty: bool = True,
    ):
        """x [B, T, H] -> (x [B, T, H], expert counts [E], router prob sums [E] or None)."""
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, positions, cache_empty)
        m, counts, prob_sum = self.moe(self.ffn_norm(x), need_probs)
        return x + m, counts, prob_sum


class OutputHead(nn.Module):
    """lm_head (no bias). Given targets it returns the summed cross-entropy without full logits."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))  # [V, H]

    def forward(
        self,
        h: torch.Tensor,
        targets: torch.Tensor | None = None,
        temperature: float | None = None,
        rows: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """logits (of the last position alone with last_only); with targets the summed
        cross-entropy, or with a temperature the targets' log-probabilities and entropies [B, T]
        (model/logprobs.py); on the flat positions `rows` [K] alone when given (Transformer.forward)."""
        h, w, split = self.parts(h)
        if targets is None:
            h = h[:, -1:] if last_only else h
            if h.shape[1] == 1:  # sampling's logits (a decode step, a prompt's last position): fp32
                return self.whole_logits(head_logits(h, w))
            return self.whole_logits(h @ w.to(h.dtype).T)  # [B, T, V]
        if temperature is not None:
            return logprobs_at(h, w, targets, temperature, rows, **split)
        return fused_linear_cross_entropy(h.flatten(0, -2), w, targets.flatten(), rows=rows, **split)

    def parts(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(hidden states, this process's weight rows, how its vocabulary part combines): here all
        of it (a vocabulary-parallel head overrides this and `whole_logits`)."""
        return h, self.weight, {}

    def whole_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


class Transformer(nn.Module):
    """gpt-oss. Built on the meta device, then `to_empty` + `init_weights()` (see module doc)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)  # no padding_idx: every row trains
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = OutputHead(args.dim, args.vocab_size)
        # Derived from the args, never saved: recomputed by init_weights() after to_empty().
        self.register_buffer("rope_cos", torch.empty(args.max_seq_len, args.head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(args.max_seq_len, args.head_dim // 2), persistent=False)

    def blocks(self) -> list[nn.Module]:
        """The blocks this model holds, in order: all of them, or a pipeline stage's share (see forward)."""
        return [b for b in self.layers if b is not None]

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None, seed: int | None = None) -> None:
        """Set every parameter and buffer: N(0, std) weights, zero biases, unit norms, RoPE tables.

        Each process draws only the part of each parameter it holds, on its device, from
        generators seeded by (seed, name, block), so the values do not depend on how the model is
        sharded (see init.py). seed None draws one from torch's RNG. A run that loads every
        parameter from a checkpoint calls `init_buffers()` alone.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        init_params(self, seed, self.args.init_std)
        self.init_buffers(buffer_device)

    @torch.no_grad()
    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """The buffers: RoPE tables (derived, never saved) and the balancing biases (zero)."""
        device = device or self.rope_cos.device
        cos, sin = rope_tables(self.args, device)
        self.rope_cos, self.rope_sin = cos, sin
        for layer in self.blocks():
            if layer.moe.router.expert_bias is not None:
                layer.moe.router.expert_bias.zero_()
            if layer.moe.router.balanced_routing:
                layer.moe.router.choice_counts.zero_()

    def set_expert_kernel(self, kernel: str) -> None:
        """How every MoE layer runs its expert GEMMs: "loop", "batched" or "grouped" (moe.py;
        `moe.resolve_expert_kernel` picks one for a device and dtype)."""
        if kernel not in EXPERT_KERNELS[1:]:
            raise ValueError(f"expert kernel {kernel!r} is not one of {', '.join(EXPERT_KERNELS[1:])}")
        for layer in self.blocks():
            layer.moe.experts.kernel = kernel

    def set_mxfp4_qat(self, on: bool) -> None:
        """MXFP4-aware training: every expert matrix is quantized to MXFP4 and back in the forward
        (as the export will store it; model/mxfp4.py), gradients pass straight through to the
        full-precision weights."""
        for layer in self.blocks():
            layer.moe.experts.mxfp4_qat = on

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for sequences of up to max_len tokens (sliding layers keep the window only)."""
        a = self.args
        if max_len > a.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {a.max_seq_len}")
        dtype = dtype or self.tok_embeddings.weight.dtype
        dev = self.rope_cos.device
        return KVCache(
            [
                LayerCache(
                    batch,
                    self.layers[i].attention.n_kv_heads,  # the heads this process holds
                    a.head_dim,
                    min(a.sliding_window, max_len) if a.is_sliding(i) else max_len,
                    ring=a.is_sliding(i),
                    dtype=dtype,
                    device=dev,
                )
                for i in range(a.n_layers)
            ]
        )

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        router_probs: bool = False,
        cache: KVCache | None = None,
        start_pos: int | torch.Tensor = 0,
        documents: Documents | None = None,
        hidden_states: bool = False,
        seq_len: int | None = None,
        logprob_temperature: float | None = None,
        target_rows: torch.Tensor | None = None,
        last_only: bool = False,
    ):
        """tokens [B, T] -> logits [B, T, V].

        documents (from `documents.find_documents`): a packed batch whose tokens attend only inside
        their own document, with positions restarting at each document start (no cache). Or any
        layout with `positions` [B, T] and `attend(q, k, v, sinks, window)`: context parallelism
        passes its share of a split sequence this way (parallel/context_parallel.py).

        With a cache (from `new_cache`), the tokens are positions start_pos .. start_pos + T - 1:
        the prompt first (start_pos 0), then one token at a time; keys and values are kept in the
        cache. A 0-d tensor start_pos keeps every decode step's graph the same under torch.compile.

        With targets [B, T] (next tokens, -100 = ignore) it returns instead a tuple
        (summed cross-entropy, router prob sums [L, E] or None, expert counts [L, E]) without
        materializing logits. The prob sums (asked for with router_probs=True) and counts feed
        `load_balancing_loss`; the caller pools the counts over ranks first when data-parallel.

        With targets and logprob_temperature, the tuple's first two are instead the targets'
        log-probabilities under softmax(logits / temperature) and the entropies, [B, T] each
        (0 where ignored; reinforcement learning, model/logprobs.py). target_rows [K], indices into
        the flattened [B * T] targets, limits the lm_head's work to those positions (every other
        target must be ignored: a chat batch's prompts; train/batching.py finds them on the host).

        last_only=True (without targets) returns the last position's logits [B, 1, V] alone: a
        prompt's prefill needs no [B, T, V] (64 prompts of 500 tokens: 13 GB in bf16).

        hidden_states=True returns the final normed hidden states [B, T, H] instead (the caller
        applies `output` itself). A model cut for a pipeline stage (modules set to None) runs what
        it holds: without tok_embeddings, `tokens` are the previous stage's hidden states
        [B, T, H] (seq_len: T, when they hold a share of the sequence, e.g. split over
        tensor-parallel ranks); without norm it returns its last block's hidden states.
        """
        B, T = tokens.shape[0], seq_len or tokens.shape[1]
        if isinstance(start_pos, int) and start_pos + T > self.args.max_seq_len:
            raise ValueError(
                f"sequence length {start_pos + T} exceeds the model's max_seq_len {self.args.max_seq_len}"
            )
        positions = None
        if documents is not None:
            if cache is not None:
                raise ValueError("document masking applies to training forwards, not to a KV cache")
            cos, sin = self.rope_cos[documents.positions], self.rope_sin[documents.positions]  # [B, T, D/2]
        elif cache is None and isinstance(start_pos, int):
            cos, sin = self.rope_cos[start_pos : start_pos + T], self.rope_sin[start_pos : start_pos + T]
        else:
            positions = start_pos + torch.arange(T, device=tokens.device)  # [T]
            cos, sin = self.rope_cos.index_select(0, positions), self.rope_sin.index_select(0, positions)
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens  # [B, T, H]
        cache_empty = cache is None or cache.empty
        masks = self._attention_masks(B, T, h, documents) if cache_empty else {}
        counts, prob_sums = [], []
        for layer in self.blocks():
            i = layer.layer_id
            window = self.args.sliding_window if self.args.is_sliding(i) else None
            layer_cache = cache.layers[i] if cache is not None else None
            h, c, p = layer(h, cos, sin, masks.get(window), router_probs, layer_cache, positions, cache_empty)
            counts.append(c)
            prob_sums.append(p)
        if cache is not None:
            cache.empty = False
        if self.norm is None:
            return h
        h = self.norm(h)
        if hidden_states:
            return h
        if targets is None:
            return self.output(h, last_only=last_only)
        counts_t = torch.stack(counts)  # [L, E]
        if logprob_temperature is not None:
            logp, ent = self.output(h, targets, logprob_temperature, target_rows)
            return logp, ent, counts_t
        ce_sum = self.output(h, targets, rows=target_rows)
        probs_t = torch.stack(prob_sums) if router_probs else None  # [L, E]
        return ce_sum, probs_t, counts_t

    def _attention_masks(self, B: int, T: int, h: torch.Tensor, documents: Documents | None = None) -> dict:
        """window (None for full layers) -> the attention mask of a [B, T] batch, built here, once
        per forward and outside compiled regions, in the dtype the attention will run in. With
        documents: the Documents themselves (CPU), or a flex document block mask (CUDA)."""
        dev, dtype = h.device, compute_dtype(h)
        windows = {
            self.args.sliding_window if self.args.is_sliding(i) else None for i in range(self.args.n_layers)
        }
        if hasattr(documents, "attend"):
            return dict.fromkeys(windows, documents)
        if documents is not None:
            return document_masks(documents, windows, dev)
        return {w: attention_mask(B, T, w, dev, dtype) for w in windows}
