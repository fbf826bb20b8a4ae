"""The model on the Triton path (under TRITON_INTERPRET=1 on the CPU) matches the torch path.

Switching `kernels` must not change results beyond dtype tolerance: logits of the golden fixtures, and
greedy generation through the KV cache (whose rolling buffer exercises the explicit-positions mode).
The tests that run kernels take the `triton_device` fixture (tests/conftest.py): CUDA when there is a
GPU, else the CPU with TRITON_INTERPRET=1 for those tests only, never for the process.
"""

import os

import pytest
import torch
from safetensors.torch import load_file

import komt
from komt.generate import generate
from komt.model.load import choose_kernels

pytest.importorskip("triton")


def _kernels_match_the_session_setting(at_start):
    from triton.runtime.interpreter import InterpretedFunction

    import kernels
    from kernels import fused_rms_norm
    from kernels._launch import interpreting

    assert os.environ.get("TRITON_INTERPRET") == at_start
    assert isinstance(fused_rms_norm._rms_norm_fwd_kernel, InterpretedFunction) == interpreting()
    if not interpreting() and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            kernels.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)


def test_kernels_before_the_interpreter_fixture_are_compiled(triton_interpret_at_start):
    """Runs first in this file: imports the kernel module with the interpreter off (as a plain session does)."""
    _kernels_match_the_session_setting(triton_interpret_at_start)


def test_triton_device_fixture_runs_the_kernels(triton_device):
    """On the CPU this fails without the interpreter: a compiled Triton kernel cannot take CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    import kernels
    from kernels import fused_rms_norm
    from kernels.reference import rms_norm_reference

    if triton_device.type == "cpu":
        assert os.environ["TRITON_INTERPRET"] == "1"
        assert isinstance(fused_rms_norm._rms_norm_fwd_kernel, InterpretedFunction)  # re-made, though imported before
    x, w = torch.randn(3, 40, device=triton_device), torch.randn(40, device=triton_device)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), atol=1e-5, rtol=1e-5)


def test_interpreter_fixture_does_not_leak_into_later_tests(triton_interpret_at_start):
    """Runs after the fixture's tests: TRITON_INTERPRET is as the session found it, and so are the kernels."""
    _kernels_match_the_session_setting(triton_interpret_at_start)


@pytest.mark.parametrize("name", ["tiny-mistral", "tiny-llama"])
def test_triton_path_matches_reference_logits(fixtures, name, triton_device):
    model = komt.load_model(fixtures / name, kernels="triton", device=triton_device)
    assert model.kernels == "triton"
    expected = load_file(fixtures / name / "expected.safetensors")
    with torch.no_grad():
        logits = model(expected["input_ids"].to(triton_device))
    torch.testing.assert_close(logits.cpu(), expected["logits"], atol=1e-4, rtol=0)


def test_triton_path_generates_the_same_tokens_past_the_window(fixtures, triton_device):
    """tiny-mistral has W = 8: 20 new tokens wrap the rolling buffer twice."""
    expected = load_file(fixtures / "tiny-mistral" / "expected.safetensors")
    prompt = expected["greedy_prompt"][0].tolist()
    torch_model = komt.load_model(fixtures / "tiny-mistral", kernels="torch", device=triton_device)
    triton_model = komt.load_model(fixtures / "tiny-mistral", kernels="triton", device=triton_device)
    want = generate(torch_model, prompt, max_new_tokens=20)
    assert want[:16] == expected["greedy_new_ids"][0].tolist()
    assert generate(triton_model, prompt, max_new_tokens=20) == want


def test_kernel_choice(monkeypatch):
    monkeypatch.delenv("KOMT_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert choose_kernels(cpu) == "torch"
    with pytest.raises(komt.ConfigError, match="needs a CUDA device"):  # no interpreter: triton needs CUDA
        choose_kernels(cpu, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (only the choice is tested here: no kernel runs)
    assert choose_kernels(cpu, "triton") == "triton"
    monkeypatch.setenv("KOMT_KERNELS", "triton")
    assert choose_kernels(cpu) == "triton"
    monkeypatch.setenv("KOMT_KERNELS", "cuda-magic")
    with pytest.raises(komt.ConfigError, match="cuda-magic"):
        choose_kernels(torch.device("cpu"))


def test_komt_runs_without_triton_installed(fixtures):
    """macOS / Windows have no triton: importing komt and kernels and generating on the CPU must work."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now raises ImportError
        "import kernels, komt\n"
        "from komt.generate import generate\n"
        f"m = komt.load_model({str(fixtures / 'tiny-mistral')!r})\n"
        "assert m.kernels == 'torch'\n"
        "print(len(generate(m, [1, 5, 9], max_new_tokens=4)))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "4"


def test_head_dim_the_kernels_cannot_tile_falls_back_or_errors(monkeypatch):
    monkeypatch.delenv("KOMT_KERNELS", raising=False)
    assert choose_kernels(torch.device("cuda"), head_dim=8) == "torch"  # default choice falls back, says so
    with pytest.raises(komt.ConfigError, match="head_dim"):
        choose_kernels(torch.device("cuda"), "triton", head_dim=96)


@pytest.mark.slow
def test_compiled_decode_on_the_triton_path_generates_the_same_tokens(fixtures, triton_device):
    """Under torch.compile the kernels are opaque custom ops (kernels.ops): no graph breaks, same tokens.

    Compiling through the kernels' Python launchers fails outright under the interpreter, so this also
    guards the wiring that `--kernels triton --compile ...` relies on on a GPU.
    """
    model = komt.load_model(fixtures / "tiny-mistral", kernels="triton", device=triton_device)
    prompt = [1, 17, 300, 42, 9]
    want = generate(model, prompt, max_new_tokens=12)
    assert generate(model, prompt, max_new_tokens=12, compile_mode="default") == want


def test_custom_ops_compute_what_the_functions_compute(triton_device):
    import kernels
    from kernels import ops

    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape).to(triton_device) for shape in ((1, 4, 3, 16), (1, 2, 7, 16), (1, 2, 7, 16)))
    x, w = torch.randn(5, 32).to(triton_device), torch.randn(32).to(triton_device)
    torch.testing.assert_close(ops.attention_op(q, k, v, True, 4, None, None, None),
                               kernels.attention(q, k, v, causal=True, window=4))
    torch.testing.assert_close(ops.attention_op(q[:, :, :1], k, v, True, None, None, None, None),
                               kernels.attention(q[:, :, :1], k, v))
    torch.testing.assert_close(ops.rms_norm_op(x, w, 1e-6), kernels.rms_norm(x, w, 1e-6))


def test_importing_komt_and_kernels_registers_no_op():
    """Nothing registers at import (issue 13): custom ops appear on first use only."""
    import subprocess
    import sys

    code = (
        "import torch, komt, kernels, komt.model.cpu_layouts, komt.generate\n"
        "for ns, name in (('kernels', 'attention'), ('kernels', 'rms_norm'), ('kernels', 'int8_matmul'), "
        "('komt', 'block_gemv')):\n"
        "    try:\n"
        "        getattr(getattr(torch.ops, ns), name)\n"
        "        raise SystemExit(f'{ns}::{name} registered at import')\n"
        "    except (AttributeError, RuntimeError):\n"
        "        pass\n"
        "from kernels import ops\n"
        "ops.attention_op\n"
        "torch.ops.kernels.attention  # registered on first use\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr + run.stdout
