"""The Mistral/Llama architecture and Hugging Face checkpoint loading (imports nothing above it)."""

from komt.model.config import PRESETS, ModelConfig, preset
from komt.model.load import load_model
from komt.model.transformer import Transformer

__all__ = ["ModelConfig", "PRESETS", "preset", "Transformer", "load_model"]
