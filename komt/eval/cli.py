"""`python -m komt.eval`: komt's LLM-judged evaluation on 37 Korean instructions, and perplexity.

Evaluate a model (answers sampled with the model card's settings, judged 0-5 by an OpenAI-compatible
endpoint), then print its row among komt's published ones:

    OPENAI_API_KEY=... python -m komt.eval --model davidkim205/komt-mistral-7b-v1 \\
        --output runs/komt-mistral-7b-v1.jsonl --judge-url https://api.openai.com/v1 --judge-model gpt-4o

Judge existing answers instead of generating (komt's published files have the right shape):

    python -m komt.eval --answers answers.jsonl --output runs/mine.jsonl \\
        --judge-url http://127.0.0.1:8000/v1 --judge-model judge --api-key-env MY_KEY

Rerunning the same command resumes: ids already in --output are skipped. With every id scored, the
judge flags are not needed and the command only prints the report.

Perplexity of a model (and adapter) on a text file or on instruction JSONL (answer tokens only):

    python -m komt.eval --model ckpt --adapter out/adapter --perplexity heldout.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from komt.argtypes import non_negative_int, number, positive_int
from komt.entry_point import run_entry_point
from komt.errors import DataError
from komt.interrupts import raise_on_interrupt
from komt.model.quantized_linear import QUANTIZE_CHOICES
from komt.model.device import requested_device
from komt.model.dtypes import DTYPE_CHOICES, resolve_dtype
from komt.eval.answers import (
    MODEL_CARD_MAX_NEW_TOKENS,
    MODEL_CARD_SAMPLING,
    cached_answerer,
    file_answerer,
    load_model_answerer,
    read_answers,
)
from komt.eval.judge import Judge, JudgeError
from komt.eval.questions import load_questions
from komt.eval.report import report, row_from_records
from komt.eval.results import read_results
from komt.eval.run import evaluate

DEFAULT_PPL_MAX_LEN = 2048


def build_parser() -> argparse.ArgumentParser:
    doc_head, _, doc_rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(prog="python -m komt.eval", description=doc_head, epilog=doc_rest,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("answers")
    source.add_argument("--model", help="checkpoint folder or hub id to generate answers with")
    source.add_argument("--adapter", help="LoRA adapter folder applied to --model")
    source.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="quantize the linear layers while loading")
    source.add_argument("--group-size", type=positive_int, help="quantization group size (int8: per channel; int4: 32)")
    source.add_argument("--tokenizer", help="tokenizer.model or its folder (default: the checkpoint's)")
    source.add_argument("--answers", help="JSONL with id and answer: judge these instead of generating")
    source.add_argument("--questions", help="JSONL (id, instruction) or text, one per line (default: komt's 37)")
    source.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    source.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="auto (default): bf16 on CUDA, the checkpoint's dtype on the CPU")
    source.add_argument("--max-new-tokens", type=positive_int, default=MODEL_CARD_MAX_NEW_TOKENS,
                        help=f"default {MODEL_CARD_MAX_NEW_TOKENS} (the model card's)")
    source.add_argument("--seed", type=int, default=0, help="question id i is sampled with seed + i (default 0)")
    source.add_argument("--temperature", type=number(0), default=MODEL_CARD_SAMPLING["temperature"])
    source.add_argument("--top-k", type=non_negative_int, default=MODEL_CARD_SAMPLING["top_k"])
    source.add_argument("--top-p", type=number(0, 1, low_open=True), default=MODEL_CARD_SAMPLING["top_p"])
    judging = parser.add_argument_group("judge")
    judging.add_argument("--judge-url", help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    judging.add_argument("--judge-model", help="the model name to send to the judge endpoint")
    judging.add_argument("--api-key-env", help="environment variable holding the key (default OPENAI_API_KEY)")
    judging.add_argument("--judge-timeout", type=number(0, low_open=True), default=120.0,
                         help="seconds per request (default 120)")
    judging.add_argument("--judge-retries", type=non_negative_int, default=5,
                         help="retries of a failed request, with exponential back-off (default 5)")
    judging.add_argument("--judge-attempts", type=positive_int, default=3,
                         help="replies asked for before a reply with no score counts as 0 (default 3)")
    out = parser.add_argument_group("output")
    out.add_argument("--output", help="results JSONL (komt's format), appended to and resumed")
    out.add_argument("--name", help="the run's name in the report (default: --output's file name)")
    ppl = parser.add_argument_group("perplexity")
    ppl.add_argument("--perplexity", metavar="FILE", help="text file, or instruction JSONL (answer tokens only)")
    ppl.add_argument("--max-length", type=positive_int,
                     help=f"tokens per sequence (default: the model's context, at most {DEFAULT_PPL_MAX_LEN})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    raise_on_interrupt()  # imported: from here Ctrl-C stops the run the ordinary way (each record is on disk)
    if args.perplexity:
        return run_entry_point(lambda: run_perplexity(args, parser))
    return run_entry_point(lambda: run_evaluation(args, parser),
                           interrupted=f"\ninterrupted; run the same command again to resume from {args.output}")


def run_evaluation(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.output:
        parser.error("--output is required (except with --perplexity)")
    output = Path(args.output)
    questions = load_questions(args.questions)
    pending = [q for q in questions if q.id not in read_results(output, questions)]
    judge = answer = None
    if pending:
        if bool(args.model) == bool(args.answers):
            parser.error(f"{len(pending)} questions are not scored yet: give --model or --answers (one of them)")
        if not args.judge_url or not args.judge_model:
            parser.error(f"{len(pending)} questions are not scored yet: --judge-url and --judge-model are required")
        if args.answers:
            answers = read_answers(args.answers, questions)
            missing = [q.id for q in pending if q.id not in answers]
            if missing:
                raise DataError(f"{args.answers}: no answer for question id(s) {', '.join(map(str, missing))}")
            answer = file_answerer(answers, args.answers)
        else:
            device = requested_device(args.device)
            answerer = load_model_answerer(
                args.model, args.adapter, args.tokenizer, device, resolve_dtype(args.dtype, device),
                quantize=args.quantize, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                seed=args.seed, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            )
            answer = cached_answerer(answerer, output.with_suffix(".answers.jsonl"), questions)
        judge = Judge(args.judge_url, args.judge_model, api_key=_api_key(args.api_key_env),
                      timeout_s=args.judge_timeout, retries=args.judge_retries)
    records, unparsed = evaluate(questions, output, answer, judge, attempts=args.judge_attempts)
    row = row_from_records(args.name or output.stem, records)
    print(report(row, unparsed, compare=args.questions is None))
    return 0


def _api_key(env_name: str | None) -> str | None:
    """The judge key: from --api-key-env's variable (which must be set), else OPENAI_API_KEY if set."""
    if env_name:
        key = os.environ.get(env_name)
        if not key:
            raise JudgeError(f"--api-key-env {env_name}: the environment variable {env_name} is not set")
        return key
    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        print("note: OPENAI_API_KEY is not set; the judge requests carry no key", file=sys.stderr)
    return key


def run_perplexity(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.model:
        parser.error("--perplexity needs --model")
    import komt
    from komt.eval.perplexity import file_examples, perplexity
    from komt.generate.vocab import check_tokenizer_fits

    device = requested_device(args.device)
    model = komt.load_model(args.model, device=device, dtype=resolve_dtype(args.dtype, device),
                            adapter=args.adapter, quantize=args.quantize, group_size=args.group_size)
    tokenizer = komt.load_tokenizer(args.tokenizer or getattr(model, "source_path", args.model))
    check_tokenizer_fits(tokenizer.vocab_size, model.config.vocab_size, tokenizer.source)
    max_len = args.max_length or min(model.config.max_position_embeddings, DEFAULT_PPL_MAX_LEN)
    result = perplexity(model, file_examples(tokenizer, args.perplexity, max_len), max_len)
    note = f", {result.truncated} cut to {max_len} tokens" if result.truncated else ""
    print(f"perplexity {result.value:.4f} (mean NLL {result.mean_nll:.4f} nats over {result.tokens} tokens, "
          f"{result.sequences} sequences{note})")
    return 0
