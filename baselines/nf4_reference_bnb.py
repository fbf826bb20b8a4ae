"""Reference NF4 tensors from bitsandbytes, pinned in tests/fixtures/nf4/expected.safetensors for komt.model.nf4.

bitsandbytes is never a dependency of komt; run this in a throwaway venv that has it (its CPU path is
enough), e.g.

    python -m venv --system-site-packages /tmp/bnbvenv && /tmp/bnbvenv/bin/pip install --no-deps bitsandbytes
    /tmp/bnbvenv/bin/python baselines/nf4_reference_bnb.py

It quantizes a fixed weight (normal values with a few outliers, [24, 320], so the 120 block maxima need a
partial second-level block) with QLoRA's settings, `quantize_4bit(quant_type="nf4", blocksize=64,
compress_statistics=True)`, and saves the input, bitsandbytes' 4-bit indices (unpacked, so the file does
not depend on nibble order), the block-maxima codes, the second-level scales and offset, both code maps,
and the dequantized weight.
"""

from pathlib import Path

import bitsandbytes
import bitsandbytes.functional as bnbf
import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nf4" / "expected.safetensors"


def main() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 320, generator=g) * 0.02
    weight[3, 17], weight[10, 200], weight[20, 5] = 0.5, -0.3, 0.0  # outliers, and an exact zero
    weight[7, 64:128] = 0.0  # a whole block of zeros (absmax 0)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    flat = packed.reshape(-1)
    indices = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(weight.shape)  # bnb: first element HIGH
    tensors = {
        "weight": weight, "indices": indices.contiguous(), "absmax_codes": state.absmax,
        "nested_absmax": state.state2.absmax, "nested_offset": state.offset.reshape(()).float(),
        "quant_map": state.code.float(), "nested_quant_map": state.state2.code.float(),
        "dequantized": bnbf.dequantize_4bit(packed, state),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT),
              metadata={"source": f"baselines/nf4_reference_bnb.py, bitsandbytes {bitsandbytes.__version__}, "
                                  f"torch {torch.__version__}"})
    print(f"wrote {OUT}: max |dequantized - weight| = {(tensors['dequantized'] - weight).abs().max():.3e}")


if __name__ == "__main__":
    main()
