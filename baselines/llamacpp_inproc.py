"""llama.cpp in the calling process (llama-cpp-python), loaded with its fastest CPU kernels that run here.

Baseline only: imported by the side-by-side scripts in baselines/, never by komt. They run in a venv that
holds both komt's dependencies and llama-cpp-python (see baselines/README.md), so that komt and llama.cpp
take turns in one process and machine noise hits both alike.

Which kernels llama.cpp runs (`kernels`). Its CPU backend can move weights into "extra" buffer types whose
layout its faster kernels read; by default every weight goes to the first extra type that takes it:

- "AMX" (Intel AMX tiles; this VM's CPU reports AMX_INT8): takes Q4_0/Q4_1/Q8_0 weights. On this VM the
  first llama_decode segfaults inside `ggml_backend_amx_mul_mat` (gdb backtrace; 1 or 2 threads, mmap or
  not; the kernel grants the AMX tile permission, so it is llama.cpp's AMX kernel, not a missing permission).
- "CPU_REPACK": rows interleaved 8 by 8 for the AVX2/AVX-512 GEMV/GEMM kernels (`q4_0_8x8_q8_0`). In
  llama.cpp 0.3.36 (ggml 0.25.3) x86 repacks Q4_0, Q4_K and IQ4_NL only: Q8_0 has repacked kernels on Arm
  alone, F32 none.

So "auto" (the default) gives each file the fastest path that works: no AMX (use_extra_bufts = false) and,
when the layer weights are Q4_0, a tensor-type override that puts exactly those weights (`blk.N.attn_*`,
`blk.N.ffn_*`) into CPU_REPACK. F32 and Q8_0 files run llama.cpp's plain CPU kernels (ggml's AVX-512 dot
products, llamafile's sgemm for prompt batches), which is also what they would get without AMX on any x86.
"plain" never repacks; "default" is llama.cpp's own choice (AMX first), which crashes on this VM.

The buffer type is looked up by name through ggml's C API (ggml_backend_dev_get_extra_bufts), which
llama-cpp-python does not wrap; the override array must outlive the model, so it is kept on the object.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass

import llama_cpp
import llama_cpp.llama as llama_module
import numpy as np

KERNELS = ("auto", "plain", "repack", "default")
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1  # KV cache types (ggml_type)
KV_TYPES = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16}
# The matrix weights of the transformer blocks (not token_embd, which is also read by GET_ROWS).
LAYER_WEIGHTS = r"blk\.[0-9]+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight"
REPACKED_ON_X86 = ("Q4_0",)  # of the types these scripts use; see the module docstring


class _Override(ctypes.Structure):  # struct llama_model_tensor_buft_override
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _lib(name: str) -> ctypes.CDLL:
    return ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", name))


def extra_buffer_types() -> dict[str, int]:
    """{name: ggml_backend_buffer_type_t} of the CPU backend's extra buffer types ("AMX", "CPU_REPACK", ...)."""
    llama_cpp.llama_backend_init()
    ggml, base = _lib("libggml.so"), _lib("libggml-base.so")
    ggml.ggml_backend_dev_by_type.restype, ggml.ggml_backend_dev_by_type.argtypes = ctypes.c_void_p, [ctypes.c_int]
    base.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    base.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    base.ggml_backend_buft_name.restype, base.ggml_backend_buft_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    cpu = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    address = base.ggml_backend_reg_get_proc_address(base.ggml_backend_dev_backend_reg(cpu),
                                                      b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return {}
    get_extra = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
    found, array = {}, get_extra(cpu)
    i = 0
    while array and array[i]:
        found[base.ggml_backend_buft_name(array[i]).decode()] = array[i]
        i += 1
    return found


def layer_weight_types(path: str) -> set[str]:
    """GGUF type names of the file's block matrix weights (read with komt's GGUF reader: headers only)."""
    from komt.model.gguf.reader import GGUFFile

    f = GGUFFile(path)
    return {info.type.name for name, info in f.tensors.items() if re.fullmatch(LAYER_WEIGHTS, name)}


@dataclass
class LlamaCpp:
    """A loaded llama.cpp model and context, with what it runs on."""

    llm: llama_cpp.Llama
    kernels: str  # what was asked for
    description: str  # what it runs: buffer types and why
    _keep: object = None  # the override array, alive as long as the model

    @property
    def n_vocab(self) -> int:
        return self.llm.n_vocab()

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        """Prefill `prompt` (no BOS added), then `new_tokens` greedy tokens, one llama_decode each; no EOS stop."""
        llm = self.llm
        llm.reset()
        llm.eval(prompt)
        out = []
        for i in range(new_tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(self.n_vocab,))
            token = int(logits.argmax())
            out.append(token)
            if i < new_tokens - 1:
                llm.eval([token])
        return out

    def logits(self, ids: list[int]) -> np.ndarray:
        """float32 [T, vocab] logits of every position of `ids` (needs logits_all=True at load)."""
        llm = self.llm
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)


def load(path: str, threads: int = 2, n_ctx: int = 512, kernels: str = "auto", logits_all: bool = False,
         kv_type: str = "f16", flash_attn: bool = False, use_mmap: bool = False) -> LlamaCpp:
    """llama.cpp's model + context for the GGUF `path` with `kernels` (module docstring), `threads` for
    both decode and prompt batches, weights read into memory (no mmap), the given KV cache type."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    types = layer_weight_types(path)
    repack = kernels == "repack" or (kernels == "auto" and types and types <= set(REPACKED_ON_X86))
    if repack and not types <= set(REPACKED_ON_X86):
        raise ValueError(f"{path}: layer weights {sorted(types)}; this llama.cpp repacks only {REPACKED_ON_X86} on x86")
    overrides = None
    if repack:
        bufts = extra_buffer_types()
        if "CPU_REPACK" not in bufts:
            raise RuntimeError(f"this llama.cpp build has no CPU_REPACK buffer type (it has {sorted(bufts)})")
        overrides = (_Override * 2)()  # NULL-terminated
        overrides[0].pattern, overrides[0].buft = LAYER_WEIGHTS.encode(), bufts["CPU_REPACK"]
        description = f"layer weights ({'/'.join(sorted(types))}) in CPU_REPACK, the rest plain CPU; no AMX"
    elif kernels == "default":
        description = "llama.cpp's default buffer types (AMX first, then CPU_REPACK)"
    elif kernels == "plain":
        description = f"plain CPU buffers for {'/'.join(sorted(types))} (repacking off); no AMX"
    else:
        description = f"plain CPU buffers for {'/'.join(sorted(types))} (no repacked kernel for them on x86); no AMX"

    default_params = llama_cpp.llama_model_default_params

    def params():  # Llama() builds its model params from this function; adjust them before it loads
        p = default_params()
        if kernels != "default":
            p.use_extra_bufts = False
        if overrides is not None:
            p.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        return p

    llama_module.llama_cpp.llama_model_default_params = params
    try:
        llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512),
                              n_threads=threads, n_threads_batch=threads, use_mmap=use_mmap, logits_all=logits_all,
                              verbose=False, seed=0, type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type],
                              flash_attn=flash_attn)
    finally:
        llama_module.llama_cpp.llama_model_default_params = default_params
    description += f", {threads} threads, KV {kv_type}, flash attention {'on' if flash_attn else 'off'}"
    return LlamaCpp(llm, kernels, description, overrides)
