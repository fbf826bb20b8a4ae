"""`python -m komt.export gguf`: checkpoints and LoRA adapters to GGUF, read back by gguf-py and by komt.

The per-tensor bytes are checked against gguf-py's quantizers applied to the checkpoint's tensors, q/k
permuted by convert_hf_to_gguf.py's LlamaModel.permute (transcribed in test_gguf_weights); an f32 export
read back by komt gives the checkpoint's exact logits. (That llama.cpp itself loads these files and agrees
is baselines/gguf_vs_llamacpp.py: llama.cpp is never a test dependency.)
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace

import gguf
import numpy as np
import pytest
import sentencepiece
import torch

import komt
from komt.export.cli import main
from komt.export.gguf_model import export_gguf
from komt.model.checkpoint import build_empty_model, iter_state
from komt.model.config import ModelConfig
from komt.model.gguf.canonical import QuantizedTensor
from komt.model.gguf.names import from_gguf_rows
from komt.model.gguf.reader import GGUFFile
from komt.model.gguf.weights import read_gguf_weights
from test_gguf_weights import llama_cpp_permute, reference_name

GT = gguf.GGMLQuantizationType


def export(fixtures, tmp_path, name="tiny-mistral", t="f16", tokenizer=None):
    out = tmp_path / f"{name}-{t}.gguf"
    tok = tokenizer or fixtures / "tokenizer" / "tokenizer.model"
    written = export_gguf(fixtures / name, out, t, tokenizer=tok)
    return out, dict(written)


def expected_type(name: str, shape: tuple[int, ...], t: str, tied: bool) -> str:
    """The converter's rule (and llama-quantize's for q4_0), restated for the test."""
    if len(shape) == 1 or name.endswith("_norm.weight"):
        return "F32"
    if t == "q4_0" and (name == "output.weight" or (tied and name == "token_embd.weight")):
        return "Q8_0" if shape[-1] % 32 == 0 else "F16"
    base = t.upper()
    return "F16" if base in ("Q8_0", "Q4_0") and shape[-1] % 32 else base


@pytest.mark.parametrize("fixture_name", ["tiny-mistral", "tiny-llama"])
@pytest.mark.parametrize("t", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_export_bytes_match_gguf_py_quantizers(fixtures, tmp_path, fixture_name, t):
    out, written = export(fixtures, tmp_path, fixture_name, t)
    config = ModelConfig.from_file(fixtures / fixture_name / "config.json")
    ref = gguf.GGUFReader(str(out))
    by_name = {x.name: x for x in ref.tensors}
    state = dict(iter_state(fixtures / fixture_name))
    if config.tie_word_embeddings:
        assert "output.weight" not in by_name
        state.pop("lm_head.weight", None)
    assert set(by_name) == {reference_name(hf) for hf in state}
    for hf, w in state.items():
        name = reference_name(hf)
        data = w.float().numpy()
        if hf.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, config.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, config.num_key_value_heads)
        want = expected_type(name, data.shape, t, config.tie_word_embeddings)
        assert by_name[name].tensor_type.name == want == written[name], name
        expected = gguf.quants.quantize(data, GT[want]).view(np.uint8).reshape(-1)
        assert np.array_equal(np.asarray(by_name[name].data).view(np.uint8).reshape(-1), expected), name


def test_export_metadata_is_what_llama_cpp_reads(fixtures, tmp_path):
    out, _ = export(fixtures, tmp_path, t="q8_0")
    fields = {k: f for k, f in gguf.GGUFReader(str(out)).fields.items()}
    value = {k: f.contents() for k, f in fields.items()}
    assert value["general.architecture"] == "llama" and value["general.file_type"] == 7
    assert value["llama.block_count"] == 2 and value["llama.attention.head_count_kv"] == 2
    assert value["llama.rope.dimension_count"] == 16 and value["llama.attention.sliding_window"] == 8
    assert fields["llama.context_length"].types == [gguf.GGUFValueType.UINT32]
    assert fields["llama.rope.freq_base"].types == [gguf.GGUFValueType.FLOAT32]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(fixtures / "tokenizer" / "tokenizer.model"))
    tokens = value["tokenizer.ggml.tokens"]
    assert value["tokenizer.ggml.model"] == "llama" and len(tokens) == 1024  # the model's vocab, as the converter
    assert tokens == [sp.IdToPiece(i) for i in range(1024)]
    assert value["tokenizer.ggml.scores"] == pytest.approx([sp.GetScore(i) for i in range(1024)])
    assert value["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]  # <unk>, <s>, </s>, <0x00>
    assert value["tokenizer.ggml.token_type"][1000] == 1
    assert (value["tokenizer.ggml.bos_token_id"], value["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert value["tokenizer.ggml.unknown_token_id"] == 0 and value["tokenizer.ggml.add_bos_token"] is True
    assert "tokenizer.ggml.padding_token_id" not in value


def test_export_pads_a_vocab_larger_than_the_tokenizer(tmp_path, fixtures):
    src = tmp_path / "big-vocab"
    shutil.copytree(fixtures / "tiny-mistral", src)
    raw = json.loads((src / "config.json").read_text())
    model = komt.load_model(src)
    raw["vocab_size"] = 32003
    (src / "config.json").write_text(json.dumps(raw))
    from komt.model.safetensors_file import write_safetensors

    state = {k: v for k, v in model.state_dict().items()}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        state[k] = torch.cat([state[k], torch.zeros(32003 - 1024, 64)])
    write_safetensors(src / "model.safetensors", list(state.items()))
    out = tmp_path / "big.gguf"
    export_gguf(src, out, "f16", tokenizer=fixtures / "tokenizer" / "tokenizer.model")
    metadata = GGUFFile(out).metadata
    assert metadata["tokenizer.ggml.tokens"][32000:] == ["[PAD32000]", "[PAD32001]", "[PAD32002]"]
    assert metadata["tokenizer.ggml.token_type"][32000:] == [5, 5, 5]


@pytest.mark.parametrize("fixture_name", ["tiny-mistral", "tiny-llama"])
def test_f32_export_reads_back_to_the_same_logits(fixtures, tmp_path, fixture_name):
    out, _ = export(fixtures, tmp_path, fixture_name, "f32")
    config, _, weights = read_gguf_weights(out)
    original = ModelConfig.from_file(fixtures / fixture_name / "config.json")
    assert config == replace(original, rms_norm_eps=float(np.float32(original.rms_norm_eps)))
    model = build_empty_model(config)
    model.load_state_dict(dict(weights), strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    reference = komt.load_model(fixtures / fixture_name)
    ids = torch.tensor([[1, 17, 300, 42, 999, 5, 77, 512, 3, 640, 128]])
    with torch.no_grad():
        got, want = model.eval()(ids), reference(ids)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)  # eps differs by its float32 rounding only


def test_q4_0_export_reads_back_as_int4_records(fixtures, tmp_path):
    out, _ = export(fixtures, tmp_path, t="q4_0")
    state = dict(iter_state(fixtures / "tiny-mistral"))
    for name, value in read_gguf_weights(out)[2]:
        if name == "model.layers.0.self_attn.k_proj.weight":
            assert isinstance(value, QuantizedTensor) and value.kind == "int4"
            assert torch.equal(value.offsets, value.scales * -8)
            stored = gguf.quants.quantize(llama_cpp_permute(state[name].numpy(), 2), GT.Q4_0)
            reference = torch.from_numpy(gguf.quants.dequantize(stored, GT.Q4_0))
            assert torch.equal(value.dequantize(), from_gguf_rows(reference, 2))
        if name == "lm_head.weight":
            assert isinstance(value, QuantizedTensor) and value.kind == "int8"  # output.weight in Q8_0


def test_adapter_export_matches_convert_lora_to_gguf_layout(fixtures, tmp_path):
    out = tmp_path / "lora.gguf"
    assert main(["gguf", str(fixtures / "tiny-mistral"), str(out), "--adapter", str(fixtures / "tiny-mistral-lora")]) == 0
    f = GGUFFile(out)
    ref = gguf.GGUFReader(str(out))
    assert {ref.fields[k].contents() for k in ("general.type", "adapter.type")} == {"adapter", "lora"}
    assert f.metadata["general.architecture"] == "llama" and f.metadata["adapter.lora.alpha"] == 32.0
    with pytest.raises(komt.CheckpointError, match="is a LoRA adapter GGUF"):
        read_gguf_weights(out)
    _, adapter = komt.model.lora.read_adapter_weights(fixtures / "tiny-mistral-lora")
    assert len(f.tensors) == len(adapter) == 28
    for key, tensor in adapter.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        which = "a" if ".lora_A." in key else "b"
        name = f"{reference_name(module + '.weight')}.lora_{which}"
        stored = f.float_tensor(name)
        assert f.tensors[name].type.name == "F32" and stored.shape == tensor.shape
        heads = 4 if "q_proj" in key else 2 if "k_proj" in key else None
        if which == "b" and heads:
            assert np.array_equal(stored.numpy(), llama_cpp_permute(tensor.numpy(), heads))
            assert torch.equal(from_gguf_rows(stored, heads), tensor)
        else:
            assert torch.equal(stored, tensor), name


def test_adapter_export_q8_0_and_rslora(fixtures, tmp_path):
    adapter = tmp_path / "rs"
    shutil.copytree(fixtures / "tiny-mistral-lora", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["use_rslora"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "rs.gguf"
    assert main(["gguf", str(fixtures / "tiny-mistral"), str(out), "--adapter", str(adapter), "--type", "q8_0"]) == 0
    f = GGUFFile(out)
    # llama.cpp scales by alpha / r: the written alpha makes that komt's rsLoRA scale alpha / sqrt(r)
    assert f.metadata["adapter.lora.alpha"] / 8 == pytest.approx(32 / math.sqrt(8))
    types = {n: i.type.name for n, i in f.tensors.items()}
    assert types["blk.0.attn_q.weight.lora_a"] == "Q8_0"  # A [8, 64]: rows of 64
    assert types["blk.0.attn_q.weight.lora_b"] == "F16"  # B [64, 8]: rows of 8, the converter's fallback


def test_cli_writes_and_reports(fixtures, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    tokenizer = fixtures / "tokenizer" / "tokenizer.model"
    assert main(["gguf", str(fixtures / "tiny-mistral"), str(out), "--type", "q4_0", "--tokenizer", str(tokenizer)]) == 0
    assert "wrote" in capsys.readouterr().err and GGUFFile(out).metadata["general.file_type"] == 2


@pytest.mark.parametrize("args, message", [
    (["gguf", "{missing}", "{out}"], "not a checkpoint folder"),
    (["gguf", "{mistral}", "{out}"], "--tokenizer"),  # the fixture folder has no tokenizer.model
    (["gguf", "{mistral}", "{tmp}/no/such/dir/x.gguf", "--tokenizer", "{tok}"], "existing folder"),
    (["gguf", "{mistral}", "{tmp}", "--tokenizer", "{tok}"], "existing folder"),
    (["gguf", "{mistral}", "{out}", "--tokenizer", "{mistral}/config.json"], "not a sentencepiece model"),
    (["gguf", "{mistral}", "{out}", "--adapter", "{lora}", "--type", "q4_0"], "not available for adapters"),
    (["gguf", "{mistral}", "{out}", "--adapter", "{mistral}"], "adapter_config.json"),
    (["gguf", "{llama}", "{out}", "--adapter", "{lora}"], "expected"),  # a tiny-mistral adapter on tiny-llama
])
def test_cli_errors_are_one_line_exit_2(fixtures, tmp_path, capsys, args, message):
    values = {"missing": tmp_path / "missing", "out": tmp_path / "o.gguf", "tmp": tmp_path,
              "mistral": fixtures / "tiny-mistral", "llama": fixtures / "tiny-llama",
              "lora": fixtures / "tiny-mistral-lora", "tok": fixtures / "tokenizer" / "tokenizer.model"}
    assert main([a.format(**values) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "o.gguf").exists()


def test_module_help_and_bad_type():
    done = subprocess.run([sys.executable, "-m", "komt.export", "gguf", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--adapter" in done.stdout and "llama.cpp" in done.stdout
    with pytest.raises(SystemExit) as exit_info:
        main(["gguf", "a", "b", "--type", "q5_k"])
    assert exit_info.value.code == 2
