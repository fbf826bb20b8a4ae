"""llama.cpp's GGUF format: read (v2/v3), dequantize, map onto komt's names and quantized records, write.

    reader.py     GGUFFile: header, metadata, tensor infos, zero-copy tensor bytes, all checked
    quants.py     dequantize(bytes, type) for F32/F16/BF16, Q8_0, Q4_0/1, Q5_0/1, Q2_K..Q6_K
    quantize.py   quantize(tensor, type) for F32/F16/BF16/Q8_0/Q4_0, byte-identical to llama.cpp
    canonical.py  QuantizedTensor: Q8_0 -> int8, Q4_0/Q4_1 -> int4 (QUANT_SPEC.md), exactly, and back
    names.py      llama.cpp <-> Hugging Face tensor names, the q/k RoPE row permutation
    config.py     ModelConfig <-> llama.* metadata
    weights.py    read_gguf_weights: (config, metadata, (hf_name, tensor | QuantizedTensor) one at a time)
    writer.py     write_gguf: GGUF v3, streaming, atomic
"""

from komt.model.gguf.canonical import QuantizedTensor
from komt.model.gguf.reader import GGUFFile
from komt.model.gguf.weights import read_gguf_weights
from komt.model.gguf.writer import TensorToWrite, write_gguf

__all__ = ["GGUFFile", "QuantizedTensor", "read_gguf_weights", "TensorToWrite", "write_gguf"]
