"""Where the answers come from: komt's generator with the model card's settings, or an existing file.

Generation follows komt-mistral-7b-v1's model card: the prompt BOS + `[INST]{instruction} [/INST]`
(komt.generate.prompt's `auto` format: `card` for komt's models, the chat template of checkpoints that ship
one) and sampling with temperature 0.8, top_k 100, top_p 0.8, at most
1024 new tokens. Question `id` is sampled with seed `seed + id`, so an interrupted and resumed run writes
the same answers as one that ran straight through.

Generated answers are also appended to a side file (`<output>.answers.jsonl`) before they are judged: if
the judge is down or rejects the key, the GPU time is not lost, and the rerun judges the saved answers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from komt.errors import DataError
from komt.eval.questions import Question
from komt.train.jsonl import read_jsonl
from komt.eval.results import cut_torn_tail

if TYPE_CHECKING:
    import torch

MODEL_CARD_SAMPLING = {"temperature": 0.8, "top_k": 100, "top_p": 0.8}
MODEL_CARD_MAX_NEW_TOKENS = 1024

Answerer = Callable[[Question], str]


@dataclass
class ModelAnswerer:
    """Answers questions with a loaded komt model and tokenizer."""

    model: object
    tokenizer: object
    max_new_tokens: int = MODEL_CARD_MAX_NEW_TOKENS
    seed: int = 0
    temperature: float = MODEL_CARD_SAMPLING["temperature"]
    top_k: int = MODEL_CARD_SAMPLING["top_k"]
    top_p: float = MODEL_CARD_SAMPLING["top_p"]

    def __call__(self, question: Question) -> str:
        # Imported here: judging answers from a file (--answers) needs neither torch nor the generator.
        from komt.generate import generate
        from komt.generate.prompt import prompt_format

        prompt_ids = prompt_format(self.tokenizer).prompt(question.instruction)
        new_ids = generate(
            self.model, prompt_ids, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            top_k=self.top_k, top_p=self.top_p, seed=self.seed + question.id, eos_id=self.tokenizer.stop_ids,
        )
        return self.tokenizer.decode(new_ids)


def load_model_answerer(
    model_path: str, adapter: str | None = None, tokenizer_path: str | None = None,
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, quantize: str | None = None,
    group_size: int | None = None, **settings,
) -> ModelAnswerer:
    """Load the checkpoint (and adapter, quantized if asked) and its tokenizer (the checkpoint folder's, unless given)."""
    import komt
    from komt.generate.vocab import check_tokenizer_fits

    model = komt.load_model(model_path, device=device, dtype=dtype, adapter=adapter, quantize=quantize,
                            group_size=group_size)
    tokenizer = komt.load_tokenizer(tokenizer_path or getattr(model, "source_path", model_path))
    check_tokenizer_fits(tokenizer.vocab_size, model.config.vocab_size, tokenizer.source)
    return ModelAnswerer(model, tokenizer, **settings)


def read_answers(path: str | Path, questions: list[Question]) -> dict[int, str]:
    """Answers by id from a JSONL with `id` and `answer` (komt's published files qualify).

    An `instruction`, if present, must be the question's: answers to another question set would be
    judged against the wrong questions.
    """
    path = Path(path)
    by_id = {q.id: q for q in questions}
    answers: dict[int, str] = {}
    for line_no, record in read_jsonl(path):
        qid, answer = record.get("id"), record.get("answer")
        if qid not in by_id or isinstance(qid, bool):
            raise DataError(f"{path}:{line_no}: id {qid!r} is not one of the {len(questions)} questions")
        if not isinstance(answer, str):
            raise DataError(f"{path}:{line_no}: \"answer\" must be text, got {answer!r:.40}")
        instruction = record.get("instruction")
        if instruction is not None and str(instruction).strip() != by_id[qid].instruction.strip():
            raise DataError(f"{path}:{line_no}: the instruction of id {qid} differs from the question's")
        answers[qid] = answer
    return answers


def file_answerer(answers: dict[int, str], source: str | Path) -> Answerer:
    """An Answerer that looks answers up; a question with none is a DataError naming the file."""

    def answer(question: Question) -> str:
        if question.id not in answers:
            raise DataError(f"{source}: no answer for question id {question.id}")
        return answers[question.id]

    return answer


def cached_answerer(answer: Answerer, cache_path: str | Path, questions: list[Question]) -> Answerer:
    """Wrap `answer` so each new answer is appended (flushed, fsynced) to `cache_path` and reused later."""
    cache_path = Path(cache_path)
    if cache_path.exists():
        cut_torn_tail(cache_path)
    cached = read_answers(cache_path, questions) if cache_path.exists() else {}

    def answer_with_cache(question: Question) -> str:
        if question.id not in cached:
            cached[question.id] = answer(question)
            record = {"id": question.id, "instruction": question.instruction, "answer": cached[question.id]}
            with open(cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return cached[question.id]

    return answer_with_cache
