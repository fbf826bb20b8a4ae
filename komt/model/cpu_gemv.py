"""fp32 matrix-vector products on all CPU cores: the layout behind komt's fast fp32 CPU decoding.

Decoding one token multiplies one activation row by every weight matrix, so its speed is the speed at which
the weights stream from memory. PyTorch sends a one-row `x @ W.T` to MKL's sgemv, which (measured on a
2-core AMD EPYC VM) runs on one core at ~11 GB/s whatever `torch.set_num_threads` says. The same product
written as a batched matmul over P blocks of W, `bmm(x, W.view(P, O/P, I).mT)`, is a free view of the same
memory, and MKL runs the P blocks on P cores.

Which blocks stream fastest depends on the shape (SmolLM2-135M's shapes, 2 threads, fp32):
- row blocks of W as stored (O, I): best where rows are long: down_proj (576 x 1536) 26 GB/s, o_proj 21;
- column blocks of W stored transposed (I, O): best where the output is wide: the vocabulary projection
  (49152 x 576) 31 GB/s against 22, and gate/up fused into one (3072 x 576) 30 GB/s against 22.

`SplitGEMVLinear` is the row-block variant; `fuse_fp32` stores projections that read the same input
(q/k/v, gate/up) as one column-major matrix and computes them in one column-block product. Only a single
fp32 row on the CPU takes these paths; anything else (prefill, batches, autograd) is a plain `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from komt.model.linear import SharedInputGroup


def _bmm_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """One row x (I elements) times P weight blocks [P, I, O/P] -> the O outputs, block p giving range p."""
    P = blocks.shape[0]
    return torch.bmm(x.reshape(1, 1, -1).expand(P, 1, -1), blocks).view(-1)  # (P, 1, I) @ (P, I, O/P)


_LIBRARY: torch.library.Library | None = None


def register_block_gemv_op() -> None:
    """Define `komt::block_gemv`, the opaque op compiled code calls (once; when a layout is first applied).

    Inductor lowers a bmm of an expanded row into its own loops, which streamed these weights at half the
    speed (40 ms a compiled SmolLM2-135M step against 25 with the op opaque). Defined with
    torch.library.Library rather than the custom_op decorator: ~1 us of dispatch a call against ~3.5.
    Registered on use, never at import.
    """
    global _LIBRARY
    if _LIBRARY is not None:
        return
    library = torch.library.Library("komt", "DEF")
    library.define("block_gemv(Tensor x, Tensor blocks) -> Tensor")
    library.impl("block_gemv", _bmm_blocks, "CPU")
    torch.library.register_fake("komt::block_gemv", lambda x, blocks: x.new_empty(blocks.shape[0] * blocks.shape[2]))
    _LIBRARY = library


def block_gemv(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """`_bmm_blocks`, kept opaque to torch.compile (eager code calls it directly: the op costs ~1 us)."""
    if torch.compiler.is_compiling():
        return torch.ops.komt.block_gemv(x, blocks)
    return _bmm_blocks(x, blocks)


def n_blocks_for(out_features: int, threads: int) -> int:
    """The largest block count <= threads that divides the output rows evenly."""
    for p in range(min(threads, out_features), 0, -1):
        if out_features % p == 0:
            return p
    return 1


class SplitGEMVLinear(nn.Linear):
    """An `nn.Linear` whose single-row fp32 products run as `n_blocks` row blocks in one `bmm`.

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
        register_block_gemv_op()

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


def fuse_fp32(members: tuple[nn.Linear, ...], threads: int) -> SharedInputGroup | None:
    """Store `members`' weights as one column-major matrix (I, sum O) and compute them as one product.

    The weights are copied once into the matrix and each member's `weight` becomes an (O, I) view into it
    (column-major strides), so memory is not doubled and the state dict is unchanged. The fused product is
    used for one fp32 row while every member still holds its view; anything else runs member by member.
    """
    n_in = members[0].in_features
    total = sum(m.out_features for m in members)
    P = n_blocks_for(total, threads)
    if P < 2:
        return None
    w0 = members[0].weight
    matrix = torch.empty(n_in, total, dtype=w0.dtype, device=w0.device)  # (I, sum O)
    with torch.no_grad():
        lo = 0
        for member in members:
            matrix[:, lo : lo + member.out_features].copy_(member.weight.t())
            member.weight.data = matrix[:, lo : lo + member.out_features].t()  # (O, I) view, column-major
            if isinstance(member, SplitGEMVLinear):
                member._refresh()  # no row-block view of a column-major slice: it takes F.linear
            lo += member.out_features
    # (I, sum O) -> (I, P, sum O / P) -> (P, I, sum O / P): block p computes output columns of range p
    blocks = matrix.view(n_in, P, total // P).permute(1, 0, 2)
    views_at = tuple(m.weight.data_ptr() for m in members)
    register_block_gemv_op()

    def product(x: torch.Tensor) -> torch.Tensor | None:
        if x.numel() != n_in or x.dtype != matrix.dtype or x.requires_grad:
            return None
        # Compiled code skips this check (Dynamo cannot trace data_ptr): swap weights before compiling.
        if not torch.compiler.is_compiling() and any(
            m._parameters["weight"].data_ptr() != at for m, at in zip(members, views_at)
        ):
            return None  # a weight was replaced since: the fused copy is stale
        return block_gemv(x, blocks).view(x.shape[:-1] + (total,))

    group = SharedInputGroup(members, product)
    group.matrix = matrix  # keeps the storage alive; for tests and readers
    return group
