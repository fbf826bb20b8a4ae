"""Text in, text out: tokenizer, prompt format, KV cache, sampler, decoding loop, streaming, CLI."""

from komt.generate.generation import (
    GenerationStats,
    decode_step,
    generate,
    generate_batch,
    prefill,
    stream_generate,
    stream_text,
)
from komt.generate.gguf_tokenizer import tokenizer_from_gguf_metadata
from komt.generate.prompt import PromptFormat, prompt_format
from komt.generate.sampling import SamplingParams, sample
from komt.generate.tokenizer import Tokenizer, load_tokenizer

__all__ = ["generate", "generate_batch", "stream_generate", "stream_text", "prefill", "decode_step",
           "sample", "SamplingParams", "GenerationStats", "Tokenizer", "load_tokenizer",
           "tokenizer_from_gguf_metadata", "PromptFormat", "prompt_format"]
