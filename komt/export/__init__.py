"""Export komt checkpoints and adapters to other runtimes' formats (GGUF for llama.cpp)."""

from komt.export.gguf_adapter import export_adapter_gguf
from komt.export.gguf_model import export_gguf

__all__ = ["export_gguf", "export_adapter_gguf"]
