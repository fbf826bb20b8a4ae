"""The numbers of the GGUF format: magic, versions, metadata value types, tensor types and their block sizes.

GGUF (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is llama.cpp's file format. The values
below are the ones `ggml.h` and gguf-py's `constants.py` define; komt reads every value type and every
tensor type's size (so any file's layout can be checked), and dequantizes the types komt's published
files use (see `quants.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 (32-bit counts, 2023) is refused by name, as llama.cpp does
WRITE_VERSION = 3
DEFAULT_ALIGNMENT = 32  # `general.alignment` when the file does not say
QK_K = 256  # the super-block of the K-quants
QUANTIZATION_VERSION = 2  # `general.quantization_version` of every current file

# Metadata value types (gguf_type in gguf.h).
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
# struct format of each fixed-size value type (little-endian).
SCALAR_FORMATS = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f",
                  BOOL: "?", UINT64: "Q", INT64: "q", FLOAT64: "d"}


@dataclass(frozen=True)
class TensorType:
    """A ggml tensor type: `block_size` elements along a row are stored in `type_size` bytes."""

    id: int
    name: str
    block_size: int
    type_size: int


# Every type id ggml defines (ggml.h, gguf-py GGML_QUANT_SIZES), so a file's byte layout is checkable even
# for types komt cannot dequantize. Ids 4, 5 (Q4_2, Q4_3) and 31-33, 36-38 were removed from ggml.
TENSOR_TYPES: dict[int, TensorType] = {t.id: t for t in (
    TensorType(0, "F32", 1, 4), TensorType(1, "F16", 1, 2),
    TensorType(2, "Q4_0", 32, 18), TensorType(3, "Q4_1", 32, 20),
    TensorType(6, "Q5_0", 32, 22), TensorType(7, "Q5_1", 32, 24),
    TensorType(8, "Q8_0", 32, 34), TensorType(9, "Q8_1", 32, 36),
    TensorType(10, "Q2_K", QK_K, 84), TensorType(11, "Q3_K", QK_K, 110),
    TensorType(12, "Q4_K", QK_K, 144), TensorType(13, "Q5_K", QK_K, 176),
    TensorType(14, "Q6_K", QK_K, 210), TensorType(15, "Q8_K", QK_K, 292),
    TensorType(16, "IQ2_XXS", QK_K, 66), TensorType(17, "IQ2_XS", QK_K, 74),
    TensorType(18, "IQ3_XXS", QK_K, 98), TensorType(19, "IQ1_S", QK_K, 50),
    TensorType(20, "IQ4_NL", 32, 18), TensorType(21, "IQ3_S", QK_K, 110),
    TensorType(22, "IQ2_S", QK_K, 82), TensorType(23, "IQ4_XS", QK_K, 136),
    TensorType(24, "I8", 1, 1), TensorType(25, "I16", 1, 2), TensorType(26, "I32", 1, 4),
    TensorType(27, "I64", 1, 8), TensorType(28, "F64", 1, 8), TensorType(29, "IQ1_M", QK_K, 56),
    TensorType(30, "BF16", 1, 2), TensorType(34, "TQ1_0", QK_K, 54), TensorType(35, "TQ2_0", QK_K, 66),
    TensorType(39, "MXFP4", 32, 17), TensorType(40, "NVFP4", 64, 36),
    TensorType(41, "Q1_0", 128, 18), TensorType(42, "Q2_0", 64, 18),
)}
TENSOR_TYPES_BY_NAME = {t.name: t for t in TENSOR_TYPES.values()}

# `general.file_type` (llama_ftype): what most of the weights are stored as.
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
              "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
              "Q5_K_M": 17, "Q6_K": 18, "BF16": 32}
