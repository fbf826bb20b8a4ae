"""Helper for tests/test_train_full.py, run under torchrun: train a sharded model a few steps, export it, and
compare the exported folder's logits with the sharded model's own (in memory, all-gathered per layer).

    torchrun --nproc-per-node 2 tests/fsdp_export_check.py BASE DATA OUT RESULT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import komt
from komt.generate.tokenizer import load_tokenizer
from komt.train import TrainConfig, distributed
from komt.train.full import FullWeights
from komt.train.schedule import cosine_with_warmup
from komt.train.sft import SFTObjective
from komt.train.trainer import train_step


def main(base: str, data: str, out: str, result: str) -> None:
    torch.set_num_threads(1)
    config = TrainConfig(model=base, data=data, output=out, full=True, batch_size=2, lr=1e-3, warmup_steps=0,
                         device="cpu", grad_checkpointing=True)
    ctx = distributed.setup("cpu")
    tokenizer = load_tokenizer(base)
    objective = SFTObjective.from_config(config, tokenizer, None)
    weights = FullWeights(config, ctx, None)
    model = weights.load(Path(base), tokenizer.vocab_size)
    optimizer = torch.optim.AdamW(weights.param_groups(model), lr=config.lr)
    scheduler = cosine_with_warmup(optimizer, 0, 3)
    for step in range(3):
        batch = objective.train_set[4 * step % 8:][:4]
        train_step(model, weights.forward_fn(model), objective, weights, batch, optimizer, scheduler, config, ctx)
    Path(out).mkdir(exist_ok=True)
    weights.save_final(Path(out), model)
    ids = torch.arange(40).view(2, 20) * 797 % tokenizer.vocab_size
    with torch.no_grad():
        trained = model.eval()(ids)  # every process runs the forward: the layers gather collectively
    if ctx.is_main:
        exported = komt.load_model(out)
        with torch.no_grad():
            diff = (exported(ids) - trained).abs().max().item()
        base_diff = (komt.load_model(base)(ids) - trained).abs().max().item()
        tied = model.lm_head.weight is model.model.embed_tokens.weight  # still one parameter after training
        Path(result).write_text(json.dumps({"max_diff": diff, "base_diff": base_diff, "tied": tied,
                                            "files": sorted(p.name for p in Path(out).iterdir())}))
    distributed.teardown(ctx, finished=True)  # rank 0 did extra work above: the others wait for it


if __name__ == "__main__":
    main(*sys.argv[1:5])
