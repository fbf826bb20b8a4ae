# Baseline only (never part of komt): transformers + peft LoRA step on the komt-mistral-7b shape, bf16, r 8, seq 1024.
import time, torch
from transformers import MistralConfig, MistralForCausalLM
from peft import LoraConfig, get_peft_model
cfg = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, sliding_window=4096, rope_theta=10000.0)
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    model = MistralForCausalLM(cfg)
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
    target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]))
for n, p in model.named_parameters():
    if p.requires_grad: p.data = p.data.float()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
B, T = 1, 1024
ids = torch.randint(0, 32000, (B, T), device="cuda")
torch.cuda.reset_peak_memory_stats()
times = []
for step in range(6):
    torch.cuda.synchronize(); t = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(); times.append(time.perf_counter() - t)
dt = sum(times[2:]) / len(times[2:])
print(f"transformers+peft LoRA step: {B*T/dt:.0f} tokens/s, {dt*1000:.0f} ms/step, peak {torch.cuda.max_memory_allocated()/2**30:.1f} GiB")
