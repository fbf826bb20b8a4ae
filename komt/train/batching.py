"""Which examples go into which batch: a deterministic function of (seed, epoch), shared by every process.

An optimizer step consumes one *global batch* of G = batch_size * grad_accum * world_size examples. Each
process cuts the same global batch the same way, so no data ever crosses processes and a resumed run
rebuilds exactly the batches it was about to see from nothing but the step number:

    epoch e:  shuffle(seed, e) -> windows of 64 global batches -> sort each window by length
              -> cut into global batches -> shuffle their order (seed, e)
    step s:   epoch s // steps_per_epoch, batch s % steps_per_epoch
    global batch [x0 .. x(G-1)] (sorted by length) -> micro-batch k = a * world_size + rank
              holds x(kB) .. x(kB + B - 1) for accumulation step a on process `rank`

Sorting within windows puts examples of similar length together (less padding) while the shuffles keep
the order random at the scale of the epoch. When the dataset is not a multiple of G, the last batch is
filled by wrapping around to the start of the epoch's order, so every process always has full micro-batches.
"""

from __future__ import annotations

import math
import random

import torch

from komt.generate.prompt import IGNORE_INDEX, pad_training_example
from komt.train.data import Example

SORT_WINDOW = 64  # global batches sorted together: enough to group lengths, few enough to stay random


def split_eval(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, eval indices): a seeded random `fraction` of the n examples held out (at least one)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    if fraction <= 0:
        return sorted(order), []
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise ValueError(f"eval split {fraction} of {n} examples leaves none to train on")
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def steps_per_epoch(n_examples: int, global_batch: int) -> int:
    return math.ceil(n_examples / global_batch)


def epoch_batches(lengths: list[int], global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch as lists of example indices (see module docstring)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    n_batches = steps_per_epoch(len(order), global_batch)
    order = [order[i % len(order)] for i in range(n_batches * global_batch)]  # wrap around to fill the last
    batches = []
    window = SORT_WINDOW * global_batch
    for start in range(0, len(order), window):
        group = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [group[j:j + global_batch] for j in range(0, len(group), global_batch)]
    rng.shuffle(batches)
    return batches


def micro_batches(global_batch: list[int], batch_size: int, grad_accum: int, rank: int,
                  world_size: int) -> list[list[int]]:
    """This process's `grad_accum` micro-batches of a global batch: k = a * world_size + rank."""
    return [global_batch[(a * world_size + rank) * batch_size:][:batch_size] for a in range(grad_accum)]


def length_chunks(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length and cut into chunks of `batch_size` (scoring and evaluation: little padding)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def shard_chunks(n_chunks: int, rank: int, world_size: int) -> list[int | None]:
    """This process's chunks, dealt round-robin, padded with None so every process gets as many.

    A sharded (FSDP) model gathers its weights collectively in every forward, so all processes must run
    the same number of forwards; a process that runs out repeats a chunk and discards the result.
    """
    rounds = -(-n_chunks // world_size)
    return [k if k < n_chunks else None for k in range(rank, rounds * world_size, world_size)]


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: (input_ids [B, T], labels [B, T]), labels IGNORE_INDEX on padding.

    Right padding leaves every real position's logits unchanged under causal attention, so a padded batch
    trains exactly like its examples one by one.
    """
    length = max(len(e.ids) for e in examples)
    rows = [pad_training_example(e.ids, e.labels, length, pad_id) for e in examples]
    input_ids = torch.tensor([ids for ids, _ in rows], dtype=torch.long)  # (B, T)
    labels = torch.tensor([labels for _, labels in rows], dtype=torch.long)  # (B, T)
    return input_ids, labels


def count_targets(examples: list[Example]) -> int:
    """Label tokens the loss averages over (position 0 is never a target: nothing predicts it)."""
    return sum(sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in examples)
