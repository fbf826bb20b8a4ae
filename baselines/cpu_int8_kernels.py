"""Per-channel int8 one-row products on the CPU: torch._weight_int8pack_mm against the int4 kernel run as two
nibble halves (q = 16 hi + lo, as komt.model.cpu_quantized.Int8GroupedCPULinear runs Q8_0), over every
projection of SmolLM2-135M (`smol`, default) or four layers of the 7B shape (`7b`), 2 threads.

    PYTHONPATH=. python baselines/cpu_int8_kernels.py [smol|7b]

Prints the error of each against the exact product and ms per pass over all layers (3 rounds).
"""
import sys, time, torch
from komt.model.quant import pack_int4
from komt.model.quantized_linear import Int4Linear, Int8Linear
from komt.model.cpu_quantized import Int8CPULinear, Int4CPULinear
torch.set_num_threads(2)
torch.manual_seed(0)
which = sys.argv[1] if len(sys.argv) > 1 else "smol"
if which == "smol":
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]
else:
    shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)] * 4

def int8_layer(o, i):
    q = torch.randint(-127, 128, (o, i), dtype=torch.int8)
    return Int8Linear(q, torch.rand(o, 1).half() * 0.01 + 0.001)

def halves(layer, g):
    q = layer.weight.detach().to(torch.int16)
    o, i = q.shape
    nib = torch.cat((torch.div(q, 16, rounding_mode="floor") + 8, q % 16), dim=1)
    s = layer.scales.detach().float().expand(o, i // g)
    scales = torch.cat((16 * s, s), dim=1)
    offs = torch.cat((-128 * s, torch.zeros_like(s)), dim=1)
    return Int4CPULinear(Int4Linear(pack_int4(nib), scales.half(), offs.half()))

layers8 = [int8_layer(o, i) for o, i in shapes]
cpu8 = [Int8CPULinear(l) for l in layers8]
variants = {"int8pack": [(l, False) for l in cpu8]}
for g in (32, 64, 128, 256):
    if all(i % g == 0 for _, i in shapes):
        variants[f"int4x2 g{g}"] = [(halves(l, g), True) for l in layers8]
xs = {i: torch.randn(1, i, dtype=torch.bfloat16) for _, i in shapes}
# check exactness of one
l = layers8[1]; x = torch.randn(1, l.in_features)
ref = x @ l.dequantize(torch.float32).t()
for name, ls in variants.items():
    m, doubled = ls[1]
    y = m._kernel_forward(torch.cat((x, x), -1) if doubled else x).float()
    print(name, "max rel err", ((y - ref).abs().max() / ref.abs().max()).item())
nbytes = sum(o * i for o, i in shapes)
for rnd in range(3):
    for name, ls in variants.items():
        t0 = time.perf_counter()
        for _ in range(5):
            for m, doubled in ls:
                x = xs[m.in_features // (2 if doubled else 1)]
                m._kernel_forward(torch.cat((x, x), -1) if doubled else x)
        dt = (time.perf_counter() - t0) / 5
        print(f"round {rnd} {name:14s} {dt*1e3:7.2f} ms/pass  {nbytes/dt/1e9:6.1f} GB/s (int8 bytes)")
