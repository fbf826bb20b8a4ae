"""kernels.int8_matmul / int4_matmul (Triton) against kernels.reference.int8_matmul_reference / int4_...

Without a GPU the kernels run in Triton's CPU interpreter for this module only (the
`interpret_without_gpu` fixture), where the wrappers pick 16-wide blocks (32 for the prefill tiling), so
the shapes below span several programs, split K across programs, and end ragged along O (and along I
where the layout allows: per-channel int8 takes any I).
Tolerances: fp32 1e-5 (fp32 dots; only the order of the sum differs); bf16 / fp16 one rounding of the
output plus one rounding of the dequantized weight to x's dtype (outputs here are O(1)). The interpreter
rounds fp32 -> bf16 toward zero (a GPU rounds to nearest), so its bf16 outputs can be one ulp off.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

import kernels  # noqa: E402
from kernels import ops  # noqa: E402
from kernels._quant import DECODE_ROWS, launch_config, split_k  # noqa: E402
from kernels.dequant_matmul_int4 import int4_matmul_forward  # noqa: E402
from kernels.dequant_matmul_int8 import int8_matmul_forward  # noqa: E402
from kernels.reference import int4_matmul_reference, int8_matmul_reference  # noqa: E402

pytestmark = pytest.mark.usefixtures("interpret_without_gpu")  # the CPU interpreter, for this module only

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ROWS = [1, 3, 16, 70]  # decode tiling (1, 3, 16: the most it takes) and prefill tiling (70: three 32-row tiles)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _int8(O, I, g, seed=0, device=DEVICE):
    """q uniform over -128..127 and scales 0.5..1.5 x 1 / (127 sqrt(I)) per group: outputs of order 1."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (O, I), generator=gen, dtype=torch.int8)
    scales = ((0.5 + torch.rand(O, I // (g or I), generator=gen)) / (127 * I**0.5)).half()
    return q.to(device), scales.to(device)


def _int4(O, I, g, seed=0, device=DEVICE):
    """Random bytes (nibbles uniform over 0..15), scales 0.5..1.5 x 1 / (8 sqrt(I)), offsets near -8 * scale."""
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (O, I // 2), generator=gen, dtype=torch.uint8)
    scales = (0.5 + torch.rand(O, I // g, generator=gen)) / (8 * I**0.5)
    offsets = -8 * scales * (0.75 + 0.5 * torch.rand(O, I // g, generator=gen))
    return packed.to(device), scales.half().to(device), offsets.half().to(device)


def _x(shape, dtype, seed=1, device=DEVICE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def _close(y, ref, dtype):
    assert y.dtype == ref.dtype == dtype and y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [None, 32, 64, 128])
@pytest.mark.parametrize("M", ROWS)
def test_int8_matmul_matches_reference(M, group_size, dtype):
    O, I = 40, (100 if group_size is None else max(128, 2 * group_size))  # per channel: I ragged against BLOCK_K
    q, scales = _int8(O, I, group_size)
    x = _x((M, I), dtype)
    _close(kernels.int8_matmul(x, q, scales, group_size), int8_matmul_reference(x, q, scales, group_size), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("M", ROWS)
def test_int4_matmul_matches_reference(M, group_size, dtype):
    O, I = 37, max(128, 2 * group_size)
    packed, scales, offsets = _int4(O, I, group_size)
    x = _x((M, I), dtype)
    _close(kernels.int4_matmul(x, packed, scales, offsets, group_size),
           int4_matmul_reference(x, packed, scales, offsets, group_size), dtype)


@pytest.mark.parametrize("M,config", [
    (3, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, n_splits=1, num_warps=1, num_stages=1)),  # few rows, GEMM tiles
    (70, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, n_splits=1, num_warps=1, num_stages=1)),  # many rows, GEMV tiles
    (70, dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, n_splits=3, num_warps=1, num_stages=1)),  # GEMM tiles, K split
])
def test_either_tiling_gives_the_reference_for_any_rows(M, config):
    q, scales = _int8(24, 192, 32, seed=2)
    packed, s4, z4 = _int4(24, 192, 64, seed=3)
    x = _x((M, 192), torch.float32, seed=4)
    _close(int8_matmul_forward(x, q, scales, 32, config=config), int8_matmul_reference(x, q, scales, 32), torch.float32)
    _close(int4_matmul_forward(x, packed, s4, z4, 64, config=config), int4_matmul_reference(x, packed, s4, z4, 64),
           torch.float32)


def test_extreme_values_and_zero_scales():
    """q = -128 and 127, nibbles 0 and 15, a group whose scale is 0 (int4: only its offset remains)."""
    O, I, g = 20, 128, 32
    q = torch.where(torch.arange(O * I).view(O, I) % 3 == 0, -128, 127).to(torch.int8)
    scales = torch.full((O, I // g), 2.0**-10).half()
    scales[::2, 1] = 0.0
    packed = torch.where(torch.arange(O * I // 2).view(O, I // 2) % 2 == 0, 0xF0, 0x0F).to(torch.uint8)  # 0/15, 15/0
    offsets = torch.full((O, I // g), -2.0**-7).half()
    x = _x((5, I), torch.float32, seed=5)
    q, scales, packed, offsets, x = (t.to(DEVICE) for t in (q, scales, packed, offsets, x))
    y8, ref8 = kernels.int8_matmul(x, q, scales, g), int8_matmul_reference(x, q, scales, g)
    y4, ref4 = kernels.int4_matmul(x, packed, scales, offsets, g), int4_matmul_reference(x, packed, scales, offsets, g)
    _close(y8, ref8, torch.float32)
    _close(y4, ref4, torch.float32)
    _close(kernels.int8_matmul(x[:, :32], q[:, :32], torch.zeros(O, 1).half().to(DEVICE)), torch.zeros(5, O).to(DEVICE),
           torch.float32)  # per channel, every scale 0


def test_leading_dims_strided_x_and_empty_rows():
    q, scales = _int8(24, 64, None)
    packed, s4, z4 = _int4(24, 64, 32)
    x = _x((2, 3, 64), torch.bfloat16)
    _close(kernels.int8_matmul(x, q, scales), int8_matmul_reference(x, q, scales), torch.bfloat16)
    strided = _x((64, 5), torch.bfloat16).T  # (64, 5) -> (5, 64): unit stride along rows, not along I
    _close(kernels.int4_matmul(strided, packed, s4, z4, 32), int4_matmul_reference(strided, packed, s4, z4, 32),
           torch.bfloat16)
    empty = kernels.int8_matmul(x[:, :0], q, scales)
    assert empty.shape == (2, 0, 24) and empty.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_gradient_for_x_matches_autograd_through_the_reference(dtype, tol):
    q, scales = _int8(24, 64, 32)
    packed, s4, z4 = _int4(24, 64, 32)
    x = _x((3, 64), dtype)
    dy = _x((3, 24), dtype, seed=6)
    for run, ref in ((lambda a: kernels.int8_matmul(a, q, scales, 32),
                      lambda a: int8_matmul_reference(a, q, scales, 32)),
                     (lambda a: kernels.int4_matmul(a, packed, s4, z4, 32),
                      lambda a: int4_matmul_reference(a, packed, s4, z4, 32))):
        xa, xb = x.clone().requires_grad_(), x.float().clone().requires_grad_()
        run(xa).backward(dy)
        ref(xb).backward(dy.float())
        assert xa.grad.dtype == dtype
        torch.testing.assert_close(xa.grad.float(), xb.grad, atol=tol, rtol=tol)


def _bad_int8_calls(q, s, x):
    return [
        (lambda: kernels.int8_matmul(x, q.to(torch.uint8), s), "int8 .*uint8"),
        (lambda: kernels.int8_matmul(x, q, s.float()), "float16 .*float32"),
        (lambda: kernels.int8_matmul(x, q, s, 48), "group_size .*dividing .*64"),
        (lambda: kernels.int8_matmul(x, q, s, 0), "group_size"),
        (lambda: kernels.int8_matmul(x, q, s.repeat(1, 2)), r"scales .*\[24, 1\].*\[24, 2\]"),  # per channel wants 1
        (lambda: kernels.int8_matmul(x, q, torch.ones(24, 8, dtype=torch.float16, device=DEVICE), 8), "multiple of 16"),
        (lambda: kernels.int8_matmul(x[:, :63], q, s), r"I = 64.*\[3, 63\]"),
        (lambda: kernels.int8_matmul(x.long(), q, s), "int64"),
        (lambda: kernels.int8_matmul(x.double(), q, s), "float64"),
        (lambda: kernels.int8_matmul(x, q.T.contiguous().T, s), "unit stride"),
        (lambda: kernels.int8_matmul(x, q, s.clone().requires_grad_()), "requires grad"),
    ]


def test_bad_inputs_raise_one_line_value_errors():
    q, s = _int8(24, 64, None)
    packed, s4, z4 = _int4(24, 64, 32)
    x = _x((3, 64), torch.float32)
    cases = _bad_int8_calls(q, s, x) + [
        (lambda: kernels.int4_matmul(x, q, s4, z4, 32), "uint8 .*int8"),
        (lambda: kernels.int4_matmul(x, packed, s4, z4[:, :1], 32), r"offsets .*\[24, 1\]"),
        (lambda: kernels.int4_matmul(x, packed, s4, z4, 16), r"scales .*\[24, 4\]"),  # shape follows g
        (lambda: kernels.int4_matmul(x, packed, s4.repeat(1, 2), z4.repeat(1, 2), 16), "multiple of 32"),
        (lambda: kernels.int4_matmul(x, packed, s4, z4, None), "group_size"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def test_kernels_refuse_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, s = _int8(8, 32, None, device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        kernels.int8_matmul(torch.randn(2, 32), q, s)
    packed, s4, z4 = _int4(8, 32, 32, device="cpu")
    with pytest.raises(ValueError, match="kernels.reference"):
        kernels.int4_matmul(torch.randn(2, 32), packed, s4, z4, 32)


def test_the_rows_choose_the_tiling_and_the_split_covers_K():
    cpu = torch.device("cpu")
    for M in (1, DECODE_ROWS, DECODE_ROWS + 1, 500):
        cfg = launch_config(M, 4096, 4096, 32, torch.bfloat16, cpu, {})
        assert cfg["BLOCK_M"] == (16 if M <= DECODE_ROWS else 32) and 32 % cfg["BLOCK_K"] == 0
    for K, block, wanted in ((4096, 256, 5), (100, 16, 4), (96, 16, 50), (16, 16, 3)):
        n, length = split_k(K, block, wanted)
        assert length % block == 0 and (n - 1) * length < K <= n * length and n <= wanted


def test_custom_ops_compute_what_the_functions_compute():
    q, s = _int8(24, 64, 32)
    packed, s4, z4 = _int4(24, 64, 32)
    x = _x((3, 64), torch.bfloat16)
    torch.testing.assert_close(ops.int8_matmul_op(x, q, s, 32), kernels.int8_matmul(x, q, s, 32))
    torch.testing.assert_close(ops.int4_matmul_op(x, packed, s4, z4, 32), kernels.int4_matmul(x, packed, s4, z4, 32))


def test_compiled_code_registers_the_ops_on_first_use_without_a_graph_break():
    """In a fresh process: `import kernels` registers neither op; a fullgraph compile of a function calling
    both registers them while tracing and computes the reference."""
    code = (
        "import torch, kernels\n"
        "from kernels.reference import int8_matmul_reference, int4_matmul_reference\n"
        "assert not hasattr(torch.ops.kernels, 'int8_matmul') and not hasattr(torch.ops.kernels, 'int4_matmul')\n"
        "x = torch.randn(2, 64)\n"
        "q = torch.randint(-128, 128, (8, 64), dtype=torch.int8); s = torch.rand(8, 2).half() / 100\n"
        "p = torch.randint(0, 256, (8, 32), dtype=torch.uint8); z = -torch.rand(8, 2).half() / 10\n"
        "f = torch.compile(lambda x: kernels.int8_matmul(x, q, s, 32) + kernels.int4_matmul(x, p, s, z, 32),\n"
        "                  fullgraph=True, backend='aot_eager')\n"
        "want = int8_matmul_reference(x, q, s, 32) + int4_matmul_reference(x, p, s, z, 32)\n"
        "torch.testing.assert_close(f(x), want, atol=1e-5, rtol=1e-5)\n"
        "assert hasattr(torch.ops.kernels, 'int8_matmul') and hasattr(torch.ops.kernels, 'int4_matmul')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))  # this child only
    if torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = ""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "ok"


MISTRAL_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # (O, I): q/o, k/v, gate/up, down


def _close_cuda(y, ref):
    """Real sizes: the error against the fp32-accumulated reference, relative to the output's scale."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    scale = ref.float().abs().mean()
    torch.testing.assert_close(y.float(), ref.float(), atol=0.05 * scale.item(), rtol=2e-2)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 8, 512])
@pytest.mark.parametrize("O,I", MISTRAL_SHAPES)
@pytest.mark.parametrize("group_size", [None, 32])
def test_int8_matmul_cuda_real_sizes(M, O, I, group_size):
    q, scales = _int8(O, I, group_size, device="cuda")
    x = _x((M, I), torch.bfloat16, device="cuda")
    _close_cuda(kernels.int8_matmul(x, q, scales, group_size), int8_matmul_reference(x, q, scales, group_size))


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 8, 512])
@pytest.mark.parametrize("O,I", MISTRAL_SHAPES)
@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_matmul_cuda_real_sizes(M, O, I, group_size):
    packed, scales, offsets = _int4(O, I, group_size, device="cuda")
    x = _x((M, I), torch.bfloat16, device="cuda")
    _close_cuda(kernels.int4_matmul(x, packed, scales, offsets, group_size),
                int4_matmul_reference(x, packed, scales, offsets, group_size))


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 5, 300])
def test_quant_matmul_cuda_other_dtypes_and_ragged_sizes(M, dtype):
    q, scales = _int8(1000, 4000, None, device="cuda")  # per channel, I not a multiple of any BLOCK_K
    packed, s4, z4 = _int4(1000, 4096, 64, device="cuda")
    x = _x((M, 4000), dtype, device="cuda")
    _close_cuda(kernels.int8_matmul(x, q, scales), int8_matmul_reference(x, q, scales))
    x = _x((M, 4096), dtype, device="cuda")
    _close_cuda(kernels.int4_matmul(x, packed, s4, z4, 64), int4_matmul_reference(x, packed, s4, z4, 64))


COMPILE_FOR_SM90 = r'''
import os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.dequant_matmul_int4 import _int4_matmul_kernel
from kernels.dequant_matmul_int8 import _int8_matmul_kernel

POINTERS = {"Q": "*i8", "P": "*u8", "S": "*fp16", "Z": "*fp16"}  # X and Y: x's dtype
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

def compile_sm90(kernel, dtype, warps, stages, **constexprs):
    """PTX and (registers, stack bytes) of one specialisation, every int argument divisible by 16."""
    sig = {p.name: "constexpr" if p.is_constexpr
           else POINTERS.get(p.name, "*" + dtype if p.name in ("X", "Y") else "i32")
           for p in kernel.params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params)
             if not p.is_constexpr and p.name != "M"}
    src = ASTSource(fn=kernel, signature=sig, constexprs=dict(constexprs, EXACT_DOT=dtype == "fp32"), attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"]); f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    return c.asm["ptx"], int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1))

import torch
import kernels._quant as quant
from kernels import dequant_matmul_int4 as int4, dequant_matmul_int8 as int8

quant.sm_count = lambda device: 132  # the tilings the wrappers would pick on an H100 / H200
for fmt, M, g, dtype in [("int8", 1, None, "bf16"), ("int8", 1, 32, "bf16"), ("int8", 512, None, "bf16"),
                         ("int8", 512, 32, "fp16"), ("int4", 1, 32, "bf16"), ("int4", 1, 128, "fp16"),
                         ("int4", 512, 32, "bf16"), ("int4", 512, 128, "bf16")]:
    module, kernel = (int8, _int8_matmul_kernel) if fmt == "int8" else (int4, _int4_matmul_kernel)
    group_k = g if fmt == "int8" else g // 2
    cfg = quant.launch_config(M, 4096, 4096, group_k, torch.bfloat16, torch.device("cuda"), module.K_CAPS)
    cfg.pop("n_splits")
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    if fmt == "int8":
        cfg.update(PER_CHANNEL=g is None, EVEN_K=True)
    ptx, regs, stack = compile_sm90(kernel, dtype, warps, stages, **cfg)
    weight_16B = "cp.async.cg.shared.global" in ptx and ", 0x10," in ptx  # 16-byte async copies
    print(fmt, M, g, dtype, cfg, regs, stack, weight_16B)
    assert stack == 0 and (weight_16B or M > 16), (fmt, M, g, dtype, regs, stack)  # the GEMV is the memory-bound one
print("ok")
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90_with_16_byte_weight_loads_and_no_spills():
    """Without a GPU the interpreter never compiles: compile the tilings the wrappers pick on an H100 / H200
    (sm_90, bf16/fp16 x) with the ptxas that triton ships, in a child without TRITON_INTERPRET (triton
    must load uninterpreted): no register spills, and the GEMV reads the weight in 16-byte copies."""
    import importlib.util

    spec = importlib.util.find_spec("triton.backends.nvidia")
    if spec is None or not (Path(spec.origin).parent / "bin" / "ptxas").exists():
        pytest.skip("this triton build has no CUDA backend / ptxas to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    run = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")
