# Baseline only (never a dependency of komt; run in a throwaway venv with transformers, see baselines/README.md).
# transformers' generate vs komt's decode on the SAME random weights, SmolLM2-135M shape, fp32, batch 1, greedy,
# alternated in one process so machine noise hits both alike.
import sys, time, statistics, torch
from transformers import LlamaConfig, LlamaForCausalLM
from komt.model.config import PRESETS
from komt.model.checkpoint import random_model
from komt.model.cpu_layouts import use_cpu_layouts
from komt.generate.generation import generate

N = int(sys.argv[1]) if len(sys.argv) > 1 else 64
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
COMPILE = sys.argv[3] if len(sys.argv) > 3 else None  # e.g. "default": komt with --compile
cfg = PRESETS["smollm2-135m"]
komt_model = random_model(cfg, "cpu", torch.float32)
hf = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
    intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
    num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
    tie_word_embeddings=True, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
    max_position_embeddings=2048)).eval()
hf.load_state_dict({k: v.clone() for k, v in komt_model.state_dict().items()}, strict=False)
hf.tie_weights()
use_cpu_layouts(komt_model)
prompt = torch.randint(0, cfg.vocab_size, (1, 32))

def hf_run():
    t = time.perf_counter()
    out = hf.generate(prompt, max_new_tokens=N, min_new_tokens=N, do_sample=False)
    return N / (time.perf_counter() - t), out[0, 32:].tolist()

def komt_run():
    t = time.perf_counter()
    ids = generate(komt_model, prompt[0].tolist(), max_new_tokens=N, temperature=0, eos_id=None, compile_mode=COMPILE)
    return N / (time.perf_counter() - t), ids

with torch.inference_mode():
    hf_run(); komt_run()
    ratios = []
    for r in range(ROUNDS):
        h, hid = hf_run(); k, kid = komt_run()
        ratios.append(k / h)
        agree = sum(a == b for a, b in zip(hid, kid))
        print(f"round {r}: transformers {h:.1f} tok/s, komt {k:.1f} tok/s, ratio {k/h:.2f} ({agree}/{N} tokens agree)", flush=True)
print(f"median ratio {statistics.median(ratios):.2f} (end-to-end incl. 32-token prefill, {N} new tokens)")
