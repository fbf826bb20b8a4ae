"""Export komt checkpoints and adapters to other runtimes' formats (GGUF for llama.cpp)."""

from komt.lazy_exports import lazy_exports

# Imported on first use (komt.lazy_exports): `python -m komt.export` reaches its Ctrl-C handler before torch.
__getattr__, __dir__ = lazy_exports(__name__, {"export_gguf": "komt.export.gguf_model",
                                               "export_adapter_gguf": "komt.export.gguf_adapter"})

__all__ = ["export_gguf", "export_adapter_gguf"]
