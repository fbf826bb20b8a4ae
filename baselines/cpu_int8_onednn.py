"""Per-channel int8 one-row products over every projection of SmolLM2-135M, 2 threads: torch._weight_int8pack_mm
(bf16 activations, komt's choice) against oneDNN's int8 x int8 `torch.ops.onednn.qlinear_pointwise` (activations
quantized per tensor to uint8, as llama.cpp quantizes them per block), the int8 dot-product path.

    PYTHONPATH=. python baselines/cpu_int8_onednn.py
"""
import time, torch
from komt.model.cpu_quantized import Int8CPULinear
from komt.model.quantized_linear import Int8Linear
torch.set_num_threads(2); torch.manual_seed(0)
shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]
ws = []
for o, i in shapes:
    q = torch.randint(-127, 128, (o, i), dtype=torch.int8)
    s = torch.rand(o, 1) * 0.01 + 0.001
    ws.append((q, s))
cpu8 = [Int8CPULinear(Int8Linear(q, s.half())) for q, s in ws]
packed = []
for q, s in ws:
    pw = torch.ops.onednn.qlinear_prepack(q, [1, q.shape[1]])
    packed.append((pw, s.view(-1).float(), torch.zeros(q.shape[0], dtype=torch.int64)))
xs = {i: torch.randn(1, i) for _, i in shapes}

def onednn(k, x):
    pw, ws_, wz = packed[k]
    amax = x.abs().amax().clamp_min(1e-8)
    scale = (amax / 127).item()
    qx = (x / scale).round().clamp(-128, 127).add(128).to(torch.uint8)
    return torch.ops.onednn.qlinear_pointwise(qx, scale, 128, pw, ws_, wz, None, 1.0, 0, torch.float32, "none", [], "")

# accuracy on one layer
q, s = ws[2]; x = xs[576]
ref = x @ (q.float() * s).t()
print("int8pack rel err", ((cpu8[2](x).float() - ref).abs().max() / ref.abs().max()).item())
print("onednn  rel err", ((onednn(2, x) - ref).abs().max() / ref.abs().max()).item())
nbytes = sum(o * i for o, i in shapes)
for rnd in range(3):
    t0 = time.perf_counter()
    for _ in range(5):
        for m in cpu8: m(xs[m.in_features])
    a = (time.perf_counter() - t0) / 5
    t0 = time.perf_counter()
    for _ in range(5):
        for k, (o, i) in enumerate(shapes): onednn(k, xs[i])
    b = (time.perf_counter() - t0) / 5
    print(f"round {rnd}: int8pack {a*1e3:.2f} ms ({nbytes/a/1e9:.1f} GB/s)  onednn {b*1e3:.2f} ms ({nbytes/b/1e9:.1f} GB/s)")
