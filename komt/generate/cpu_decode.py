"""Batch-1 decoding on the CPU near memory bandwidth: every matrix-vector product runs on all cores.

Decoding one token multiplies one activation row by every weight matrix, so its speed is the speed at
which the weights stream from memory. PyTorch sends a one-row `x @ W.T` to MKL's sgemv, which on this
project's CPU (a 2-core AMD EPYC VM) runs on one core at ~11 GB/s whatever `torch.set_num_threads` says.
The same product written as a batched matmul over P blocks of W's rows, `bmm(x, W.view(P, O/P, I).mT)`,
is a free view of the same memory, and MKL runs the P blocks on P cores.

Which layout streams fastest depends on the shape (measured on SmolLM2-135M's shapes, 2 threads, fp32):

- row blocks, W as stored (O, I): best where the rows are long: down_proj (576 x 1536) 26 GB/s,
  o_proj (576 x 576) 21 GB/s; the same matrices column-major reach only 17;
- column blocks, W stored transposed (I, O): best where the output is wide: the vocabulary projection
  (49152 x 576, 113 MB) 31 GB/s against 22, and gate/up fused into one (3072 x 576) 30 GB/s against 22.

So `use_split_gemv` (1) fuses the projections that read the same input, q/k/v and gate/up (gpt-fast's
wqkv and w13), into one column-major matrix per group (`FusedGEMV`), (2) stores `lm_head` transposed, and
(3) splits every other projection into row blocks (`SplitGEMVLinear`). Fusing also turns three products
and their dispatch into one. No weight is copied twice: each fused projection's `weight` becomes a view
into its group's matrix, and `lm_head` is re-laid out in place (tied embeddings keep sharing it).

Measured on SmolLM2-135M's shape, fp32, 2 threads, greedy, batch 1 (komt.generate.bench): 18.4 tok/s
with plain `nn.Linear`, 30-32 with row blocks everywhere, ~34 with these layouts, ~38 with the decode
step compiled (`block_gemv` keeps the products komt's there); transformers' `generate` ~18.

The swaps follow LoRA's pattern (a module that owns the same `weight`, swapped in by name), so the state
dict, tied embeddings and every other code path are unchanged; only single-row fp32 inputs on the CPU
take a split path, everything else (prefill, batches, CUDA, bf16, autograd) is a plain `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _bmm_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """One row x (I elements) times P weight blocks [P, I, O/P] -> the O outputs, block p giving range p."""
    P = blocks.shape[0]
    return torch.bmm(x.reshape(1, 1, -1).expand(P, 1, -1), blocks).view(-1)  # (P, 1, I) @ (P, I, O/P)


# The op compiled code calls. Registered with torch.library.Library rather than the custom_op decorator:
# a plain CPU kernel costs ~1 us a call in dispatch against ~3.5 (121 calls a SmolLM2-135M step).
_LIBRARY = torch.library.Library("komt", "DEF")
_LIBRARY.define("block_gemv(Tensor x, Tensor blocks) -> Tensor")
_LIBRARY.impl("block_gemv", _bmm_blocks, "CPU")


@torch.library.register_fake("komt::block_gemv")
def _(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    return x.new_empty(blocks.shape[0] * blocks.shape[2])


def block_gemv(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """`_bmm_blocks`, kept opaque to `torch.compile`.

    Inductor lowers a bmm of an expanded row into its own loops, which streamed these weights at half
    the speed (40 ms a compiled SmolLM2-135M step against 25 with the op opaque), so compiled code calls
    it as the op `komt::block_gemv`; eager code calls it directly (the op's dispatch costs ~1 us a call).
    """
    if torch.compiler.is_compiling():
        return torch.ops.komt.block_gemv(x, blocks)
    return _bmm_blocks(x, blocks)


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
        return block_gemv(x, blocks).view(x.shape[:-1] + (self.out_features,))


class FusedGEMV(nn.Module):
    """Several projections of the same input (q/k/v, or gate/up) as one column-block product.

    The projections' weights are copied once into one matrix stored transposed, (I, sum of O), and each
    projection's `weight` becomes a view into it, so memory is not doubled and the state dict is
    unchanged. A single fp32 row then takes one `bmm` over `n_blocks` column blocks and comes back as
    one output per projection; anything else (several rows, autograd, a weight or module replaced since,
    e.g. a LoRA layer swapped in) calls the projections one by one, which is always correct.

    `owner` is the module holding the projections (an Attention or an MLP) and `names` their attribute
    names; the fused path is taken only while those names still hold the same modules.
    """

    def __init__(self, owner: nn.Module, names: tuple[str, ...], n_blocks: int) -> None:
        super().__init__()
        # Plain attributes, not submodules: named_modules() and the state dict must stay the model's.
        self._owned = owner._modules
        self._names = names
        self._linears = tuple(owner._modules[name] for name in names)
        self.widths = [linear.out_features for linear in self._linears]
        self.in_features = self._linears[0].in_features
        self.n_blocks = n_blocks
        total = sum(self.widths)
        w0 = self._linears[0].weight
        matrix = torch.empty(self.in_features, total, dtype=w0.dtype, device=w0.device)  # (I, sum O)
        with torch.no_grad():
            lo = 0
            for linear, width in zip(self._linears, self.widths):
                matrix[:, lo : lo + width].copy_(linear.weight.t())
                linear.weight.data = matrix[:, lo : lo + width].t()  # (O, I) view, column-major strides
                if isinstance(linear, SplitGEMVLinear):
                    linear._refresh()  # no row-block view of a column-major slice: it takes F.linear
                lo += width
        self._matrix = matrix
        # (I, sum O) -> (I, P, sum O / P) -> (P, I, sum O / P): block p computes output columns of range p
        self._blocks = matrix.view(self.in_features, n_blocks, total // n_blocks).permute(1, 0, 2)
        self._views_at = tuple(linear.weight.data_ptr() for linear in self._linears)

    def _still_fused(self) -> bool:
        return all(
            self._owned[name] is linear and linear._parameters["weight"].data_ptr() == at
            for name, linear, at in zip(self._names, self._linears, self._views_at)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if (
            x.numel() != self.in_features
            or x.dtype != self._matrix.dtype
            or x.requires_grad
            # Compiled code skips this check (Dynamo cannot trace data_ptr): swap modules before compiling.
            or not (torch.compiler.is_compiling() or self._still_fused())
        ):
            return tuple(self._owned[name](x) for name in self._names)
        out = block_gemv(x, self._blocks)  # (sum O,): the projections' outputs one after the other
        return out.view(x.shape[:-1] + (sum(self.widths),)).split(self.widths, dim=-1)


def _n_blocks(out_features: int, threads: int) -> int:
    """The largest block count <= threads that divides the output rows evenly."""
    for p in range(min(threads, out_features), 0, -1):
        if out_features % p == 0:
            return p
    return 1


# Projections that read the same input, fused into one product: (owner attribute, projection names).
FUSED_GROUPS = (("fused_qkv", ("q_proj", "k_proj", "v_proj")), ("fused_gate_up", ("gate_proj", "up_proj")))


def _is_split_candidate(module: nn.Module) -> bool:
    """A plain projection with an fp32 CPU weight and no bias (LoRA layers keep their own forward)."""
    if type(module) not in (nn.Linear, SplitGEMVLinear) or module.bias is not None:
        return False
    w = module.weight
    return w.device.type == "cpu" and w.dtype == torch.float32


def use_split_gemv(model: nn.Module, threads: int | None = None) -> int:
    """Give `model` the CPU decoding layouts of the module docstring; return how many projections use them.

    Fuses q/k/v and gate/up (where an Attention / MLP offers `fused_qkv` / `fused_gate_up` and all its
    projections are plain fp32 CPU layers), stores `lm_head` transposed, and swaps every other plain
    `nn.Linear` for a `SplitGEMVLinear`. A no-op returning 0 on one thread, off the CPU, or for weights
    that are not fp32.
    """
    threads = threads or torch.get_num_threads()
    if threads < 2:
        return 0
    modules = dict(model.named_modules())
    fused: set[nn.Module] = set()
    for module in modules.values():
        for attr, names in FUSED_GROUPS:
            current = getattr(module, attr, "absent")
            if isinstance(current, FusedGEMV):  # fused by an earlier call
                fused.update(current._linears)
            if current is not None:
                continue  # not an owner of this group, or already fused
            linears = [module._modules.get(name) for name in names]
            if not all(linear is not None and _is_split_candidate(linear) for linear in linears):
                continue
            n_blocks = _n_blocks(sum(linear.out_features for linear in linears), threads)
            if n_blocks < 2:
                continue
            setattr(module, attr, FusedGEMV(module, names, n_blocks))
            fused.update(linears)

    lm_head = getattr(model, "lm_head", None)
    if isinstance(lm_head, nn.Linear) and _is_split_candidate(lm_head) and lm_head.weight.is_contiguous():
        with torch.no_grad():
            # (V, C) row-major -> the same (V, C) tensor stored column-major; .data keeps the Parameter (and ties)
            lm_head.weight.data = lm_head.weight.data.t().contiguous().t()

    for name, module in modules.items():
        if type(module) is not nn.Linear or module in fused or not _is_split_candidate(module):
            continue  # already-swapped layers, fused ones and LoRA layers keep their own forward
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name]
        if isinstance(getattr(parent, "weight", None), torch.Tensor):
            continue  # a part of another layer (LoRA's small A and B matrices), not a projection of the model
        n_blocks = _n_blocks(module.out_features, threads)
        if n_blocks < 2:
            continue
        setattr(parent, attr, SplitGEMVLinear(module, n_blocks))
    return len(fused) + sum(isinstance(module, SplitGEMVLinear) for module in model.modules())
