"""Supervised fine-tuning's objective: next-token cross-entropy over the label tokens of instruction data.

An objective is what the shared loop (`komt.train.trainer`) does not know: the data it trains on, the
loss of one micro-batch as a *sum* with the denominator it is divided by (here: the label tokens of the
whole global batch, so any split across micro-batches and processes averages the same), and the
metrics it logs. `komt.train.dpo.DPOObjective` is the other one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, TextIO

import torch

from komt.errors import DataError
from komt.generate.tokenizer import Tokenizer
from komt.train.batching import collate, count_targets, split_eval
from komt.train.config import TrainConfig
from komt.generate.prompt import prompt_format
from komt.train.data import Example, load_dataset
from komt.train.loss import token_loss_sum
from komt.train.progress import say

Forward = Callable[[torch.Tensor], torch.Tensor]  # input_ids [B, T] -> logits [B, T, V]


class SFTObjective:
    """The komt instruction-tuning loss (see module docstring)."""

    name = "sft"
    metric_names = ("loss",)

    def __init__(self, train_set: list[Example], eval_set: list[Example], pad_id: int,
                 fingerprint: list | None = None) -> None:
        self.train_set, self.eval_set, self.pad_id = train_set, eval_set, pad_id
        self.fingerprint = fingerprint  # what a resumed run must match: the data as tokenized, compactly

    @classmethod
    def from_config(cls, config: TrainConfig, tokenizer: Tokenizer, log: TextIO | None) -> "SFTObjective":
        """The objective over `config.data`, tokenized and split (padding with EOS, see `collate`)."""
        fmt = prompt_format(tokenizer, config.prompt_format)
        say(log, f"prompt format: {fmt.label}")
        dataset = load_dataset(config.data, fmt, config.max_seq_len)
        train_set, eval_set = split_examples(dataset.examples, config, config.data)
        dropped = f"; {dataset.n_dropped} dropped: no target within --max-seq-len" if dataset.n_dropped else ""
        say(log, f"data: {dataset.n_records} records in {config.data} -> {len(train_set)} train, "
                 f"{len(eval_set)} eval examples{dropped}")
        return cls(train_set, eval_set, tokenizer.eos_id, [len(e.ids) for e in dataset.examples])

    def length(self, example: Example) -> int:
        return len(example.ids)

    def prepare(self, **_) -> None:
        """Nothing to compute before the first step."""

    def denominator(self, examples: list[Example]) -> int:
        return count_targets(examples)

    def tokens(self, examples: list[Example]) -> int:
        return sum(len(e.ids) for e in examples)

    def micro_loss(self, forward: Forward, examples: list[Example], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token loss, [its detached value]) of one micro-batch."""
        input_ids, labels = collate(examples, self.pad_id)
        logits = forward(input_ids.to(device))  # (B, T, V) fp32
        loss = token_loss_sum(logits, labels.to(device))
        return loss, loss.detach().reshape(1)

    def summarize(self, stats: torch.Tensor, denominator: float) -> dict[str, float]:
        return {"loss": stats[0].item() / denominator}


def split_examples(examples: list, config: TrainConfig, source: str | Path) -> tuple[list, list]:
    """(train, held-out eval) by --eval-split, seeded; shared by the objectives."""
    try:
        train_idx, eval_idx = split_eval(len(examples), config.eval_split, config.seed)
    except ValueError as err:
        raise DataError(f"{source}: {err}") from None
    return [examples[i] for i in train_idx], [examples[i] for i in eval_idx]
