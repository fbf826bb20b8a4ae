"""The Mistral / Llama decoder-only transformer, written out plainly.

    tokens -> embed_tokens
           -> N x [ x + attn(RMSNorm(x)) ; x + mlp(RMSNorm(x)) ]
           -> RMSNorm -> lm_head -> logits

Mistral and Llama share this architecture; they differ only in config (Mistral adds a sliding window,
Llama-3-style checkpoints tie lm_head to the embedding). Parameter names are the Hugging Face names
(`model.layers.0.self_attn.q_proj.weight`, ...) so a checkpoint loads with no renaming table.

Shape key: B batch, T query positions, S key slots, C hidden size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from komt.model.attention import KERNEL_BACKENDS, Attention, AttentionContext
from komt.model.config import ModelConfig
from komt.model.linear import project
from komt.model.rope import rope_angles


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, as the Hugging Face Llama/Mistral RMSNorm computes it.

    Statistics in fp32 (bf16 sums over 4096 elements lose about 3 digits); the normalised value is cast
    back to x's dtype before the weight multiplies it, exactly as the reference does, so bf16 logits match.
    """
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.backend = "torch"  # set by Transformer.set_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            import kernels  # only on this path: komt runs without triton installed

            return kernels.rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_proj, self.up_proj)  # (B, T, intermediate) each
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """One decoder layer: pre-norm attention and pre-norm MLP, each added to the residual stream."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, signed_sin, ctx: AttentionContext, cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, signed_sin, ctx, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The stack under `model.` in Hugging Face names: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """A causal language model: token ids [B, T] -> next-token logits [B, T, V].

    `forward(input_ids)` scores positions 0..T-1 with no cache (training, parity tests).
    With `cache` (see komt.generate.cache.KVCache), `positions` [B, T] gives each token's absolute
    position; the cache stores keys/values and says which slots each query sees (`attention_context`).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.kernels = "torch"

    def set_kernels(self, backend: str) -> None:
        """Choose the attention/RMSNorm implementation: "torch" (any device) or "triton" (CUDA)."""
        if backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernels must be one of {KERNEL_BACKENDS}, got {backend!r}")
        self.kernels = backend
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.backend = backend

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache=None,
        last_only: bool = False,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] in fp32 (or [B, 1, V] with `last_only`, which skips the big lm_head GEMM
        for every prompt position but the last, the only one generation samples from; or [B, n, V] at the
        n query indices `logits_at` [n], for a batch packing several requests into one row).

        The cache, when given, decides what attention sees: it stores this forward's keys and builds the
        `AttentionContext` (komt.generate.cache.KVCache and the server's paged cache each their own way).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, signed_sin = rope_angles(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        window = self.config.sliding_window
        if cache is None:
            ctx = AttentionContext.build(positions, None, window, self.kernels)
        else:
            ctx = cache.attention_context(positions, window, self.kernels)
        for layer in self.model.layers:
            x = layer(x, cos, signed_sin, ctx, cache)
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            x = x[:, logits_at]  # (B, T, C) -> (B, n, C)
            if x.shape[1] == 0:  # nothing to score (a prompt's middle chunk): no head to run
                return x.new_zeros(B, 0, self.config.vocab_size, dtype=torch.float32)
        x = self.model.norm(x)
        return self.lm_head(x).float()
