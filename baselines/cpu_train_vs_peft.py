# Baseline only (never a dependency of komt; run in a throwaway venv with transformers + peft, see baselines/README.md).
# One LoRA step of komt vs transformers + peft on SmolLM2-135M's shape, fp32, CPU, sequence T (argv[1]), the komt
# recipe (r 8, alpha 32, dropout 0.05, all seven projections); the two alternate in one process, 8 rounds, first 2 dropped.
import sys, time, statistics, torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
from komt.model import Transformer, preset
from komt.model.lora import inject_lora, LoRAConfig
from komt.train.loss import token_loss_sum
T = int(sys.argv[1])
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0)
hf = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
    target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"])); hf.train()
km = Transformer(preset("smollm2-135m"))
for p in km.parameters(): p.requires_grad_(False)
inject_lora(km, LoRAConfig()); km.train()
ids = torch.randint(0, 49152, (1, T))
def make(model, loss_fn):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    def step():
        loss = loss_fn(model); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    return step
steps = {"transformers+peft": make(hf, lambda m: m(input_ids=ids, labels=ids).loss),
         "komt": make(km, lambda m: token_loss_sum(m(ids), ids) / (T - 1))}
times = {k: [] for k in steps}
for i in range(8):
    for name, step in steps.items():
        t = time.perf_counter(); step(); dt = time.perf_counter() - t
        if i >= 2: times[name].append(dt)
for name, ts in times.items():
    print(f"T={T} {name:18s} median {statistics.median(ts):.2f} s/step  ({T/statistics.median(ts):.0f} tok/s)  all {[round(x,2) for x in ts]}")
