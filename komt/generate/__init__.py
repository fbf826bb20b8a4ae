"""Text in, text out: tokenizer, prompt format, KV cache, sampler, decoding loop, streaming, CLI.

The names below are imported on first use (komt.lazy_exports), so that `python -m komt.generate` reaches
its entry point before torch is imported (see komt/generate/__main__.py).
"""

from komt.lazy_exports import lazy_exports

# name -> the module that defines it
_EXPORTS = {
    "GenerationStats": "komt.generate.generation",
    "decode_step": "komt.generate.generation",
    "generate": "komt.generate.generation",
    "generate_batch": "komt.generate.generation",
    "prefill": "komt.generate.generation",
    "stream_generate": "komt.generate.generation",
    "stream_text": "komt.generate.generation",
    "SamplingParams": "komt.generate.sampling",
    "sample": "komt.generate.sampling",
    "Tokenizer": "komt.generate.tokenizer",
    "load_tokenizer": "komt.generate.tokenizer",
    "tokenizer_from_gguf_metadata": "komt.generate.gguf_tokenizer",
    "PromptFormat": "komt.generate.prompt",
    "prompt_format": "komt.generate.prompt",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["generate", "generate_batch", "stream_generate", "stream_text", "prefill", "decode_step",
           "sample", "SamplingParams", "GenerationStats", "Tokenizer", "load_tokenizer",
           "tokenizer_from_gguf_metadata", "PromptFormat", "prompt_format"]
