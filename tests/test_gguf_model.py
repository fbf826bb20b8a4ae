"""`komt.load_model("x.gguf")`: a GGUF file becomes the same model as its Hugging Face folder.

Files are written by komt.export (byte-identical to llama.cpp's quantizers, tests/test_export_cli.py).
References: the HF folder's logits for float types; for Q8_0 / Q4_0 the model built from the file's own
dequantized weights (the records must be kept exactly, not requantized).
"""

import pytest
import torch

import komt
from komt.export import export_gguf
from komt.model.cpu_quantized import Int4CPULinear, Int8GroupedCPULinear
from komt.model.gguf import read_gguf_weights
from komt.model.quantized_linear import Int4Linear, Int8Linear

from conftest import FIXTURES, smollm2_gguf

TOKENIZER = FIXTURES / "tokenizer" / "tokenizer.model"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    files = {}
    for fixture in ("tiny-mistral", "tiny-llama"):
        for kind in ("f32", "q8_0", "q4_0"):
            files[fixture, kind] = folder / f"{fixture}-{kind}.gguf"
            export_gguf(FIXTURES / fixture, files[fixture, kind], kind, tokenizer=TOKENIZER)
    return files


def _dense_reference(path):
    """A plain fp32 model holding the file's dequantized weights (independent of the quantized layers)."""
    config, _, values = read_gguf_weights(path, dtype=torch.float32, keep_quantized=False)
    model = komt.model.Transformer(config)
    state = dict(values)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state)
    return model.eval()


def _ids(vocab):
    torch.manual_seed(0)
    return torch.randint(0, vocab, (2, 8))  # <= the window of 8: llama.cpp has no sliding window


@pytest.mark.parametrize("fixture", ["tiny-mistral", "tiny-llama"])
def test_f32_file_equals_the_hf_folder(exported, fixture):
    model = komt.load_model(exported[fixture, "f32"], layout="plain")
    hf = komt.load_model(FIXTURES / fixture, layout="plain")
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids), atol=1e-5, rtol=1e-5)
    assert model.config == komt.model.ModelConfig(**{**hf.config.__dict__, "torch_dtype": model.config.torch_dtype,
                                                     "rms_norm_eps": model.config.rms_norm_eps})


@pytest.mark.parametrize("fixture", ["tiny-mistral", "tiny-llama"])
@pytest.mark.parametrize("kind, layer", [("q8_0", Int8Linear), ("q4_0", Int4Linear)])
def test_quantized_files_keep_their_records_and_compute_the_dequantized_model(exported, fixture, kind, layer):
    path = exported[fixture, kind]
    model = komt.load_model(path, layout="plain")
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is layer and q.group_size == 32
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the embedding is always dense
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), _dense_reference(path)(ids), atol=1e-4, rtol=1e-4)


def test_cpu_layouts_and_requantization_of_a_q8_0_file(exported):
    path = exported["tiny-llama", "q8_0"]
    fast = komt.load_model(path)
    assert isinstance(fast.model.layers[0].mlp.up_proj, Int8GroupedCPULinear)  # exact, through the int4 kernel
    per_channel = komt.load_model(path, quantize="int8", layout="plain")  # requantized: Q8_0 groups -> per row
    assert per_channel.model.layers[0].mlp.up_proj.group_size == per_channel.config.hidden_size
    reference = _dense_reference(path)
    ids = _ids(fast.config.vocab_size)
    with torch.no_grad():
        want = reference(ids)
        for model in (fast, per_channel):
            assert (model(ids) - want).norm() < 2e-2 * want.norm()


def test_a_tied_q4_head_stays_quantized_as_stored(exported):
    model = komt.load_model(exported["tiny-llama", "q4_0"], layout="plain")
    assert model.config.tie_word_embeddings and model.lm_head is not model.model.embed_tokens
    assert isinstance(model.lm_head, (Int8Linear, Int4Linear))  # the file's own type for token_embd


# ChatML "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" in SmolLM2's
# vocabulary, and transformers' greedy answer on the same file's dequantized weights (baselines/
# smollm2_hf_folder.py, then `generate(do_sample=False)`): "The capital of France is Paris." + <|im_end|>.
SMOLLM2_PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
SMOLLM2_ANSWER = [504, 3575, 282, 4649, 314, 7042, 30]


def test_real_smollm2_answers_as_transformers_does():
    from komt.generate import generate

    model = komt.load_model(smollm2_gguf())
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int4CPULinear)  # Q4_1 kept, on the int4 kernel
    assert generate(model, SMOLLM2_PROMPT, max_new_tokens=12, eos_id=2) == SMOLLM2_ANSWER
