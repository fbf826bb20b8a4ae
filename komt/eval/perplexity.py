"""Token-level perplexity of a model on a text file or on instruction data.

perplexity = exp(mean NLL), the mean over every scored token of -log p(token | the tokens before it).

- Training data (.jsonl / .json: {"instruction", "output"} or {"messages"} records, the trainer's format)
  is scored the way it is trained: `komt.train.data.encode_record` builds the ids and the labels, -100
  on the prompt, so only answer tokens (and the EOS that ends each answer) count.
- A text file is one token stream (BOS + the whole text) cut into non-overlapping windows of at most
  `max_len` tokens; every token but a window's first is scored. Overlapping (strided) windows would give
  each token more context and a lower figure, at `max_len / stride` times the cost.

Sequences are scored one at a time: no padding, so no attention mask or pad labels to get wrong.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from komt.errors import DataError
from komt.generate.prompt import IGNORE_INDEX
from komt.train.loss import token_loss_sum


@dataclass(frozen=True)
class Perplexity:
    nll_sum: float  # nats, summed over scored tokens
    tokens: int
    sequences: int
    truncated: int = 0  # sequences cut to the model's context

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def value(self) -> float:
        return math.exp(self.mean_nll)


@torch.no_grad()
def perplexity(model, examples: Iterable[tuple[list[int], list[int]]], max_len: int | None = None) -> Perplexity:
    """exp(mean NLL) of `model` over (ids, labels) pairs; labels align with ids, IGNORE_INDEX = not scored.

    `model(input_ids)` maps LongTensor [B, T] to logits [B, T, V]; position t's logits score token t + 1.
    Sequences longer than `max_len` are cut to it (counted in `truncated`).
    """
    device = next(model.parameters()).device
    nll_sum, tokens, sequences, truncated = 0.0, 0, 0, 0
    for ids, labels in examples:
        if len(ids) != len(labels):
            raise DataError(f"example {sequences}: {len(ids)} ids but {len(labels)} labels")
        if max_len is not None and len(ids) > max_len:
            ids, labels = ids[:max_len], labels[:max_len]
            truncated += 1
        sequences += 1
        if len(ids) < 2:
            continue
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
        label_ids = torch.tensor([labels], dtype=torch.long, device=device)  # (1, T), aligned with the ids
        nll_sum += token_loss_sum(model(input_ids), label_ids).item()  # the trainer's loss: t's logits score t + 1
        tokens += sum(label != IGNORE_INDEX for label in labels[1:])  # the first token is never predicted
    if tokens == 0:
        raise DataError("no tokens to score: every example is empty or all its labels are -100")
    return Perplexity(nll_sum, tokens, sequences, truncated)


def instruction_examples(tokenizer, path: str | Path) -> Iterator[tuple[list[int], list[int]]]:
    """(ids, labels) per record of training data, encoded exactly as the trainer encodes it
    (`komt.train.data.encode_record`: instruction [+ input] or messages; labels on answers and their EOS)."""
    from komt.train.data import encode_record, read_records

    for line_no, record in read_records(path):
        try:
            yield encode_record(record, tokenizer)
        except DataError as e:
            raise DataError(f"{path}:{line_no}: {e}") from None


def text_examples(tokenizer, path: str | Path, max_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """Non-overlapping windows of at most `max_len` tokens of the file's text (after BOS if the tokenizer adds
    one: Llama/Mistral do, GPT-2-style vocabularies such as SmolLM2's do not); labels = ids."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as UTF-8 text ({e})") from None
    ids = tokenizer.encode(text)
    for start in range(0, len(ids), max_len):
        window = ids[start:start + max_len]
        yield window, list(window)


def file_examples(tokenizer, path: str | Path, max_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """Training examples for .jsonl / .json files, text windows for anything else."""
    if Path(path).suffix in (".jsonl", ".json"):
        return instruction_examples(tokenizer, path)
    return text_examples(tokenizer, path, max_len)
