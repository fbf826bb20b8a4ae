"""DPO's objective: preference pairs, reference log-probabilities computed once, the DPO / IPO loss.

    python -m komt.train dpo --model M --data prefs.jsonl --output runs/d

The shared loop (`komt.train.trainer`) runs it like SFT: one global batch of pairs per optimizer step,
each process its micro-batches. A micro-batch of P pairs is one forward over 2P sequences (the P prompt +
chosen, then the P prompt + rejected, right-padded), scored on their response tokens only; the loss is
summed over pairs and divided by the pairs of the global batch.

The reference model is scored once, before the first step (`prepare`), for every pair, and cached in
`output/ref_logps.pt`. That costs one no-grad forward per pair, the same as scoring the reference inside
every step for one epoch and less from the second epoch on, and it lets full-weight DPO train without a
second model in memory: the reference is the initial weights, which training then overwrites. The
reference is, in order of preference:
  - `--ref-model R` when given (loaded, scored, freed);
  - for LoRA, the model itself with its LoRA layers switched off (`lora_disabled`): the frozen base, with
    no second copy of the weights (trl's default with a PEFT model);
  - for full fine-tuning, the weights as loaded, before any step.
A resumed run reads the cache back (the initial weights of a full run no longer exist to re-score).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Callable, TextIO

import torch

from komt.atomic import atomic_file
from komt.errors import CheckpointError
from komt.generate.prompt import prompt_format
from komt.generate.tokenizer import Tokenizer
from komt.model.hub import resolve_model_path
from komt.train import distributed
from komt.train.batching import collate, length_chunks, shard_chunks
from komt.train.config import DPOConfig
from komt.train.dpo_loss import dpo_loss, sequence_logps
from komt.train.model_prep import check_vocabulary
from komt.train.preference_data import PreferencePair, load_preferences
from komt.train.progress import say
from komt.train.sft import split_examples

REF_LOGPS_FILE = "ref_logps.pt"
Forward = Callable[[torch.Tensor], torch.Tensor]  # input_ids [B, T] -> logits [B, T, V]


class DPOObjective:
    """The DPO loss over preference pairs (see module docstring)."""

    name = "dpo"
    metric_names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                    "logps/chosen", "logps/rejected")  # trl's names

    def __init__(self, config: DPOConfig, tokenizer: Tokenizer, log: TextIO | None) -> None:
        self.config, self.log = config, log
        fmt = prompt_format(tokenizer, config.prompt_format)
        say(log, f"prompt format: {fmt.label}")
        data = load_preferences(config.data, fmt, config.max_prompt_length, config.max_length)
        self.pairs = data.pairs
        self.train_idx, self.eval_idx = split_examples(list(range(len(data.pairs))), config, config.data)
        self.pad_id = tokenizer.eos_id
        self.vocab_size = tokenizer.vocab_size
        notes = [f"{n} {what}" for n, what in ((data.n_prompt_truncated, "prompts cut to --max-prompt-length"),
                                                (data.n_response_truncated, "pairs' responses cut to fit --max-length"),
                                                (data.n_dropped, "dropped: responses identical once cut"))
                 if n]
        say(log, f"data: {data.n_records} preference records in {config.data} -> {len(self.train_idx)} train, "
                 f"{len(self.eval_idx)} eval pairs" + (f"; {', '.join(notes)}" if notes else ""))
        self.fingerprint = [[len(p.prompt), len(p.chosen), len(p.rejected)] for p in data.pairs]

    @property
    def train_set(self) -> list[PreferencePair]:
        return [self.pairs[i] for i in self.train_idx]

    @property
    def eval_set(self) -> list[PreferencePair]:
        return [self.pairs[i] for i in self.eval_idx]

    def length(self, pair: PreferencePair) -> int:
        return pair.length

    def denominator(self, pairs: list[PreferencePair]) -> int:
        return len(pairs)

    def tokens(self, pairs: list[PreferencePair]) -> int:
        return sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)

    # --- the reference, once ---------------------------------------------------------------------------

    def prepare(self, *, model: torch.nn.Module, forward: Forward, weights, ctx: distributed.DistContext,
                output: Path, resuming: bool) -> None:
        """Give every pair its reference log-probs: from output/ref_logps.pt, or scored now (and cached)."""
        key = self.reference_key()
        cached = distributed.broadcast_object(read_reference_cache(output, key) if ctx.is_main else None, ctx)
        if cached is None:
            cached = self.score_reference(model, forward, weights, ctx, resuming)
            if ctx.is_main:
                write_reference_cache(output, key, cached)
            distributed.barrier(ctx)
        else:
            say(self.log, f"reference log-probs read from {output / REF_LOGPS_FILE}")
        self.pairs = [replace(p, ref_chosen=c, ref_rejected=r) for p, (c, r) in zip(self.pairs, cached)]

    def reference_key(self) -> str:
        """What the cache must have been computed from: the pairs' ids and which reference scored them."""
        h = hashlib.sha256()
        scored_by = {"own_reference": self.config.ref_model is None, "full": self.config.full}
        if self.config.base_quantize is not None:  # only when set: caches written before the flag stay valid
            scored_by["base_quantize"] = self.config.base_quantize
        h.update(json.dumps(scored_by).encode())
        for p in self.pairs:
            h.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
        return h.hexdigest()

    def score_reference(self, model, forward: Forward, weights, ctx: distributed.DistContext,
                        resuming: bool) -> list[tuple[float, float]]:
        config = self.config
        if config.ref_model is not None:
            path = resolve_model_path(config.ref_model)
            say(self.log, f"scoring the reference model {path} on {len(self.pairs)} pairs")
            reference = weights.load_reference(path)
            check_vocabulary(self.vocab_size, reference.config.vocab_size)
            values = score_pairs(weights.forward_fn(reference), reference, self.pairs, config.batch_size, ctx, self.pad_id)
            del reference
            return values
        if resuming and config.full:
            raise CheckpointError(f"{Path(config.output) / REF_LOGPS_FILE} is missing and the initial weights it was "
                                  "computed from are trained away; restore the file, or pass --ref-model with the "
                                  "starting checkpoint")
        held = f", held {config.base_quantize}" if config.base_quantize else ""
        what = f"the frozen base (LoRA switched off{held})" if not config.full else "the initial weights"
        say(self.log, f"scoring the reference, {what}, on {len(self.pairs)} pairs")
        with weights.reference(model) if not config.full else nullcontext():
            return score_pairs(forward, model, self.pairs, config.batch_size, ctx, self.pad_id)

    # --- one micro-batch -------------------------------------------------------------------------------

    def micro_loss(self, forward: Forward, pairs: list[PreferencePair], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss summed over the pairs, [sums of the logged metrics]) of one micro-batch."""
        chosen, rejected = pair_logps(forward, pairs, device, self.pad_id)  # (P,), (P,)
        ref_chosen = torch.tensor([p.ref_chosen for p in pairs], device=device)
        ref_rejected = torch.tensor([p.ref_rejected for p in pairs], device=device)
        n_chosen = torch.tensor([len(p.chosen) for p in pairs], device=device)
        n_rejected = torch.tensor([len(p.rejected) for p in pairs], device=device)
        c = self.config
        terms = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, c.beta, c.loss_type, c.label_smoothing,
                         n_chosen, n_rejected)
        loss = terms.losses.sum()
        stats = torch.stack([loss.detach(), terms.chosen_rewards.sum(), terms.rejected_rewards.sum(),
                             (terms.chosen_rewards > terms.rejected_rewards).float().sum(),
                             (terms.chosen_rewards - terms.rejected_rewards).sum(),
                             chosen.detach().sum(), rejected.detach().sum()])  # (7,) in metric_names order
        return loss, stats

    def summarize(self, stats: torch.Tensor, denominator: float) -> dict[str, float]:
        return {name: value / denominator for name, value in zip(self.metric_names, stats.tolist())}


def pair_logps(forward: Forward, pairs: list[PreferencePair], device: torch.device,
               pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of chosen and rejected, [P] each, from one forward over 2P rows."""
    sequences = [p.sequences() for p in pairs]
    rows = [chosen for chosen, _ in sequences] + [rejected for _, rejected in sequences]
    input_ids, labels = collate(rows, pad_id)  # (2P, T): chosen rows, then rejected rows
    logps = sequence_logps(forward(input_ids.to(device)), labels.to(device))  # (2P,)
    return logps[:len(pairs)], logps[len(pairs):]


@torch.no_grad()
def score_pairs(forward: Forward, model: torch.nn.Module, pairs: list[PreferencePair], batch_size: int,
                ctx: distributed.DistContext, pad_id: int) -> list[tuple[float, float]]:
    """(chosen, rejected) log-probs of every pair; each process scores its share, all get the whole list.

    Chunks of similar length, dealt round-robin; every process runs the same number of forwards (a
    sharded model gathers its weights collectively in each one), repeating a chunk where it has none left.
    """
    was_training = model.training
    model.eval()
    chunks = length_chunks([p.length for p in pairs], batch_size)
    mine: dict[int, tuple[float, float]] = {}
    for k in shard_chunks(len(chunks), ctx.rank, ctx.world_size):
        chunk = chunks[k if k is not None else 0]
        chosen, rejected = pair_logps(forward, [pairs[i] for i in chunk], ctx.device, pad_id)
        if k is not None:
            mine.update({i: (c, r) for i, c, r in zip(chunk, chosen.tolist(), rejected.tolist())})
    model.train(was_training)
    merged: dict[int, tuple[float, float]] = {}
    for part in distributed.gather_objects(mine, ctx):
        merged.update(part)
    return [merged[i] for i in range(len(pairs))]


def read_reference_cache(output: Path, key: str) -> list[tuple[float, float]] | None:
    """The cached reference log-probs if output/ref_logps.pt exists and was computed for this data."""
    path = output / REF_LOGPS_FILE
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache is only a cache: score again
        return None
    if not isinstance(saved, dict) or saved.get("key") != key:
        return None
    return list(zip(saved["chosen"].tolist(), saved["rejected"].tolist()))


def write_reference_cache(output: Path, key: str, values: list[tuple[float, float]]) -> None:
    chosen = torch.tensor([c for c, _ in values], dtype=torch.float64)
    rejected = torch.tensor([r for _, r in values], dtype=torch.float64)
    with atomic_file(output / REF_LOGPS_FILE, "wb") as f:
        torch.save({"key": key, "chosen": chosen, "rejected": rejected}, f)
