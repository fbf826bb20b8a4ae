"""Batch-1 decoding on the CPU near memory bandwidth: every matrix-vector product runs on all cores.

Decoding one token multiplies one activation row by every weight matrix, so its speed is the speed at
which the weights stream from memory. PyTorch sends a one-row `x @ W.T` to MKL's sgemv, which on this
project's CPU (a 2-core AMD EPYC VM) runs on one core at ~11 GB/s whatever `torch.set_num_threads` says.
The same product written as a batched matmul over P blocks of W's rows, `bmm(x, W.view(P, O/P, I).mT)`,
is a free view of the same memory, and MKL runs the P blocks on P cores: 19-29 GB/s on SmolLM2-135M's
shapes. The vocabulary projection (49152 x 576, 113 MB) is the exception to the row-major rule: stored
transposed, MKL's column-major kernel streams it at ~35 GB/s on 2 cores instead of ~23, so `use_split_gemv`
re-lays that one weight out in place (same values, same shape, transposed strides).

Measured on SmolLM2-135M's shape, fp32, 2 threads, greedy, batch 1 (komt.generate.bench): 18.4 tok/s
with plain `nn.Linear`, 30-32 tok/s with this; transformers 5.24's `generate` 17 tok/s on the same shape.
What is left is mostly the small projections (k/v are 0.4 MB each): fusing q/k/v and gate/up into one
matrix each would save another ~2-3 ms of the ~32 ms a token takes (measured with bmm on those shapes).

The swap follows LoRA's pattern (a module that owns the same `weight`, swapped in by name), so the state
dict, tied embeddings and every other code path are unchanged; only single-row fp32 inputs on the CPU
take the split path, everything else (prefill, batches, CUDA, bf16) is a plain `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitGEMVLinear(nn.Linear):
    """An `nn.Linear` whose single-row fp32 products run as `n_blocks` row blocks in one `bmm` (module docstring).

    Shares the wrapped layer's `weight` Parameter (no copy). The block view is rebuilt when the weight's
    storage changes (a new Parameter, `.data` replaced), so loading other weights into it stays correct.
    """

    def __init__(self, linear: nn.Linear, n_blocks: int) -> None:
        nn.Module.__init__(self)  # skip nn.Linear's allocation: the weight is the wrapped layer's
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.n_blocks = n_blocks
        self._blocks: torch.Tensor | None = None
        self._blocks_of = -1  # data_ptr of the weight `_blocks` views
        self._refresh()

    def _refresh(self) -> None:
        """Rebuild `_blocks`, the weight as P blocks [P, I, O/P] (a view), or None where no view exists."""
        w, P = self.weight.detach(), self.n_blocks
        n_out, n_in = w.shape
        if P < 2 or self.bias is not None or w.device.type != "cpu" or w.dtype != torch.float32:
            self._blocks = None
        elif w.is_contiguous():  # (O, I) row-major -> (P, O/P, I) -> (P, I, O/P)
            self._blocks = w.view(P, n_out // P, n_in).transpose(1, 2)
        elif w.t().is_contiguous():  # stored as (I, O) -> (I, P, O/P) -> (P, I, O/P)
            self._blocks = w.t().view(n_in, P, n_out // P).permute(1, 0, 2)
        else:
            self._blocks = None
        self._blocks_of = w.data_ptr()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._parameters["weight"]  # (not `self.weight`: Module.__getattr__ costs ~0.5 us, 200 calls a token)
        if not torch.compiler.is_compiling() and w.data_ptr() != self._blocks_of:
            self._refresh()  # (torch.compile guards on the weight itself; data_ptr would break its graph)
        blocks = self._blocks
        # More than one row is a GEMM, which MKL already spreads over the cores; autograd takes the plain path.
        if blocks is None or x.numel() != self.in_features or x.dtype != torch.float32 or x.requires_grad:
            return F.linear(x, w, self.bias)
        out = torch.bmm(x.reshape(1, 1, -1).expand(self.n_blocks, 1, -1), blocks)  # (P, 1, I) @ (P, I, O/P)
        return out.view(x.shape[:-1] + (self.out_features,))  # (P, 1, O/P) are consecutive output ranges


def _n_blocks(out_features: int, threads: int) -> int:
    """The largest block count <= threads that divides the output rows evenly."""
    for p in range(min(threads, out_features), 0, -1):
        if out_features % p == 0:
            return p
    return 1


def use_split_gemv(model: nn.Module, threads: int | None = None) -> int:
    """Swap every plain `nn.Linear` of `model` for a `SplitGEMVLinear`; return how many were swapped.

    Also stores the vocabulary projection `lm_head.weight` transposed in place (tied embeddings keep
    sharing it). A no-op returning 0 on one thread, off the CPU, or for weights that are not fp32.
    """
    threads = threads or torch.get_num_threads()
    swapped = 0
    lm_head = getattr(model, "lm_head", None)
    if (
        threads > 1
        and isinstance(lm_head, nn.Linear)
        and lm_head.weight.device.type == "cpu"
        and lm_head.weight.dtype == torch.float32
        and lm_head.weight.is_contiguous()
    ):
        with torch.no_grad():
            # (V, C) row-major -> the same (V, C) tensor stored column-major; .data keeps the Parameter (and ties)
            lm_head.weight.data = lm_head.weight.data.t().contiguous().t()
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if type(module) is not nn.Linear:  # already-swapped layers and LoRA layers keep their own forward
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name]
        if isinstance(getattr(parent, "weight", None), torch.Tensor):
            continue  # a part of another layer (LoRA's small A and B matrices), not a projection of the model
        w = module.weight
        if threads < 2 or w.device.type != "cpu" or w.dtype != torch.float32:
            continue
        n_blocks = _n_blocks(module.out_features, threads)
        if n_blocks < 2:
            continue
        setattr(parent, attr, SplitGEMVLinear(module, n_blocks))
        swapped += 1
    return swapped
