"""llama.cpp's tensor names <-> Hugging Face names, and the q/k row permutation between their RoPE layouts.

    token_embd.weight        model.embed_tokens.weight
    output_norm.weight       model.norm.weight
    output.weight            lm_head.weight                  (absent: tied to token_embd)
    blk.N.attn_norm.weight   model.layers.N.input_layernorm.weight
    blk.N.attn_q / attn_k / attn_v / attn_output.weight   model.layers.N.self_attn.q_proj / k_proj / v_proj / o_proj.weight
    blk.N.ffn_norm.weight    model.layers.N.post_attention_layernorm.weight
    blk.N.ffn_gate / ffn_up / ffn_down.weight             model.layers.N.mlp.gate_proj / up_proj / down_proj.weight
    rope_freqs.weight        (Llama-3 RoPE scaling factors: no HF parameter; see weights.py)

The permutation. Hugging Face's q/k rows rotate in halves (`rotate_half`: dimension i pairs with i + D/2);
llama.cpp's RoPE rotates adjacent pairs (2i, 2i + 1). `convert_hf_to_gguf.py` (LlamaModel.permute) reorders
each head's D rows so the two agree:

    gguf = hf.reshape(n_head, 2, D/2, ...).swapaxes(1, 2).reshape(O, ...)     # HF row (h, j, i) -> GGUF (h, i, j)

with n_head = num_attention_heads for q and num_key_value_heads for k. It moves whole rows only, so it
applies unchanged to anything with one row per output feature: a dense weight, GGUF block bytes, the
canonical quantized weight/scales/offsets, LoRA's B [O, r].
"""

from __future__ import annotations

import re

import torch

from komt.errors import CheckpointError
from komt.model.config import ModelConfig

_TOP_LEVEL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_PER_LAYER = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
IGNORED = ("rope_freqs.weight",)
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.([\w.]+)\.weight$")
_TO_GGUF_TOP = {hf: g for g, hf in _TOP_LEVEL.items()}
_TO_GGUF_LAYER = {hf: g for g, hf in _PER_LAYER.items()}


def hf_name(name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; an unknown name is a CheckpointError."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    match = _GGUF_LAYER.match(name)
    if match and match[2] in _PER_LAYER:
        return f"model.layers.{int(match[1])}.{_PER_LAYER[match[2]]}.weight"
    raise CheckpointError(f"GGUF tensor {name!r} is not part of a Llama/Mistral model komt knows")


def gguf_name(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight` (the inverse of `hf_name`)."""
    if name in _TO_GGUF_TOP:
        return _TO_GGUF_TOP[name]
    match = _HF_LAYER.match(name)
    if match and match[2] in _TO_GGUF_LAYER:
        return f"blk.{int(match[1])}.{_TO_GGUF_LAYER[match[2]]}.weight"
    raise CheckpointError(f"tensor {name!r} has no llama.cpp name (not a Llama/Mistral parameter)")


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter a komt Transformer of `config` loads, with its HF shape."""
    c = config
    q_rows, kv_rows = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (c.hidden_size,),
            p + "post_attention_layernorm.weight": (c.hidden_size,),
            p + "self_attn.q_proj.weight": (q_rows, c.hidden_size),
            p + "self_attn.k_proj.weight": (kv_rows, c.hidden_size),
            p + "self_attn.v_proj.weight": (kv_rows, c.hidden_size),
            p + "self_attn.o_proj.weight": (c.hidden_size, q_rows),
            p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        })
    return shapes


def rope_heads(hf: str, config: ModelConfig) -> int | None:
    """How many heads the q/k permutation splits this tensor's rows into; None for every other tensor."""
    if hf.endswith(".self_attn.q_proj.weight"):
        return config.num_attention_heads
    if hf.endswith(".self_attn.k_proj.weight"):
        return config.num_key_value_heads
    return None


def _check_rows(n_rows: int, n_head: int) -> int:
    if n_head <= 0 or n_rows % (2 * n_head):
        raise CheckpointError(f"cannot split {n_rows} q/k rows into {n_head} heads of pairs")
    return n_rows // n_head // 2


def to_gguf_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF row order -> llama.cpp's (LlamaModel.permute), along dim 0; a new contiguous tensor."""
    half = _check_rows(x.shape[0], n_head)
    rest = x.shape[1:]
    return x.reshape(n_head, 2, half, *rest).transpose(1, 2).reshape(x.shape)  # (h, 2, D/2, ...) -> (h, D/2, 2, ...)


def from_gguf_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order -> HF's (the inverse of `to_gguf_rows`), along dim 0; a new contiguous tensor."""
    half = _check_rows(x.shape[0], n_head)
    rest = x.shape[1:]
    return x.reshape(n_head, half, 2, *rest).transpose(1, 2).reshape(x.shape)  # (h, D/2, 2, ...) -> (h, 2, D/2, ...)
