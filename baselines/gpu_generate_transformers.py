# Baseline only (never part of komt): transformers' generate on the komt-mistral-7b shape, random bf16 weights.
import time, torch, sys
from transformers import MistralConfig, MistralForCausalLM
cfg = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, sliding_window=4096, rope_theta=10000.0)
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    model = MistralForCausalLM(cfg).eval()
ids = torch.randint(0, 32000, (1, 128), device="cuda")
for cache in ("dynamic",):
    kw = {} if cache == "dynamic" else {"cache_implementation": "static"}
    try:
        model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8, **kw)
        torch.cuda.synchronize(); t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=256, min_new_tokens=256, do_sample=False, **kw)
        torch.cuda.synchronize(); dt = time.perf_counter() - t
        print(f"transformers generate ({cache} cache): {(out.shape[1]-128)/dt:.1f} tokens/s (incl. prefill of 128)")
    except Exception as e:
        print(f"transformers generate ({cache}) failed: {type(e).__name__}: {e}")
