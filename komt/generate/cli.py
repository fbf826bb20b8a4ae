"""`python -m komt.generate`: answer a prompt (or chat) with komt-mistral-7b-v1, streaming to stdout.

    python -m komt.generate --prompt "제주도를 1박2일로 혼자 여행하려고 하는데 여행 코스를 만들어줘"
    python -m komt.generate --chat                      # multi-turn; /reset, /exit, Ctrl-D
    echo "프롬프트" | python -m komt.generate            # no --prompt, stdin not a terminal: one prompt

The answer streams to stdout as it is generated; one stats line goes to stderr at the end (prompt and new
tokens, time to first token, prefill and decode tokens/s). The sampling defaults are the model card's
(temperature 0.8, top-k 100, top-p 0.8, up to 1024 new tokens); `--temperature 0` is greedy.

Prompts are framed as the model was trained (`--prompt-format`, komt.generate.prompt): `auto` picks the
checkpoint's chat template when it ships one (SmolLM2, Llama-3, ...) and komt's model-card format otherwise
(komt's own models: a single prompt as `[INST]{prompt} [/INST]`, a chat in Mistral's instruct format with the
whole history); `card`, `template` and `raw` force one. The format is named on stderr before the answer.

Dtype: `--dtype auto` (the default) is bf16 on CUDA (the model card's) and the checkpoint's own dtype on
the CPU (so the 7B bf16 checkpoint loads in 14.5 GB; an fp32 checkpoint stays fp32). On the CPU the
single-row matrix products are split across cores (komt.model.cpu_layouts, applied by load_model).

Bad input (missing model, empty or too long prompt, bad sampling value, an unknown or absent device,
text that is not UTF-8, a closed stdin or an unwritable stdout) is one `error: ...` line on stderr and exit
status 2 (argparse's own errors: its usage line, status 2); Ctrl-C, also while starting, is exit 130.

The prompt plus --max-new-tokens must fit the model's context, or it is an error before anything is
generated (a chat drops its oldest exchanges to make room); the library's `generate` and the server
apply the same rule. `--chat --prompt X` starts the chat with X as the first message.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence, TextIO


from komt.argtypes import non_negative_int, number, positive_int
from komt.entry_point import run_entry_point
from komt.errors import GenerationError, KomtError
from komt.generate.context_length import check_context_length
from komt.model.attention import KERNEL_BACKENDS
from komt.model.dtypes import DTYPE_CHOICES
from komt.model.quantized_linear import QUANTIZE_CHOICES
from komt.generate.prompt import PROMPT_FORMATS
from komt.interrupts import raise_on_interrupt
from komt.progress import StatusLine, bar

DEFAULT_MODEL = "davidkim205/komt-mistral-7b-v1"
COMPILE_MODES = ("off", "default", "reduce-overhead")


# ---- arguments ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m komt.generate",
        description="Generate text with a Mistral/Llama checkpoint (default: komt-mistral-7b-v1), streaming to stdout.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint folder or Hugging Face id (default {DEFAULT_MODEL})")
    p.add_argument("--prompt", help="the prompt; without it, a chat on a terminal or one prompt read from stdin "
                                    "(with --chat: the chat's first message)")
    p.add_argument("--chat", action="store_true",
                   help="interactive multi-turn chat (/reset clears history, /exit or Ctrl-D quits)")
    p.add_argument("--max-new-tokens", type=positive_int, default=1024, metavar="N",
                   help="at most N new tokens (default 1024); the prompt plus N must fit the model's context, "
                        "else it is an error (a chat drops its oldest exchanges to make room)")
    p.add_argument("--temperature", type=number(0), default=0.8, metavar="T",
                   help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=non_negative_int, default=100, metavar="K", help="0 = off (default 100)")
    p.add_argument("--top-p", type=number(0, 1, low_open=True), default=0.8, metavar="P",
                   help="in (0, 1] (default 0.8)")
    p.add_argument("--repetition-penalty", type=number(0, low_open=True), default=1.0,
                   metavar="X", help="> 1 discourages repeating prompt and output tokens (default 1.0 = off)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    p.add_argument("--seed", type=int, help="seed for sampling (same seed, same text)")
    p.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="auto (default): bf16 on CUDA, the checkpoint's dtype on the CPU")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder (PEFT format) to apply")
    p.add_argument("--kernels", choices=KERNEL_BACKENDS, help="attention/RMSNorm kernels (default: triton on CUDA)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.model, tokenizer.json or their folder (default: the model folder's)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                   help="card: komt's [INST] format; template: the checkpoint's chat template; raw: the text as is; "
                        "auto (default): template if the checkpoint ships one, else card")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                   help="quantize the linear layers while loading: int8 per channel, int4 in groups of 32, nf4 (QLoRA's) in blocks of 64")
    p.add_argument("--group-size", type=positive_int, metavar="G",
                   help="quantization group size (int8: default per channel; int4: 32, 64 or 128)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="off",
                   help="torch.compile the decode step (reduce-overhead = CUDA graphs); compiling takes a while")
    return p


# ---- loading --------------------------------------------------------------------------------------------

class LoadProgress:
    """A `progress(bytes_done, bytes_total)` callback drawing a plain-text bar on stderr while weights load.

    Silent for checkpoints under `min_bytes` (nothing to wait for). On a terminal the bar redraws in place;
    elsewhere (a log file) it prints a line every 25% (komt.progress).
    """

    def __init__(self, stream: TextIO, min_bytes: int = 256 * 2**20, width: int = 30) -> None:
        self.line, self.min_bytes, self.width = StatusLine(stream), min_bytes, width
        self.start = time.perf_counter()
        self._last_drawn = -1

    def __call__(self, done: int, total: int) -> None:
        if total < self.min_bytes:
            return
        percent = 100 * done // max(total, 1)
        step = 1 if self.line.tty else 25
        if percent // step == self._last_drawn // step and done < total:
            return
        self._last_drawn = percent
        text = f"loading weights {bar(done, total, self.width)} {percent:3d}% {done / 1e9:.1f}/{total / 1e9:.1f} GB"
        if done >= total:
            self.line.draw(text + f" in {time.perf_counter() - self.start:.1f} s")
            self.line.close()
        else:
            self.line.draw(text)


def open_checkpoint(args: argparse.Namespace):
    """(folder, tokenizer, config) of the requested model: cheap checks before any weight is read."""
    from komt.generate.tokenizer import load_tokenizer
    from komt.model.hub import resolve_model_path
    from komt.model.load import read_checkpoint_config

    folder = Path(resolve_model_path(args.model))  # a folder, or a GGUF file (weights, vocabulary, template)
    config = read_checkpoint_config(folder)
    tokenizer = load_tokenizer(args.tokenizer or folder)
    return folder, tokenizer, config


def load_requested_model(args: argparse.Namespace, folder: Path, stderr: TextIO):
    """The model on the requested device, in the requested dtype, with a progress bar for big checkpoints."""
    from komt.model.device import requested_device
    from komt.model.dtypes import resolve_dtype
    from komt.model.load import load_model

    device = requested_device(args.device)  # `gpu0`, or CUDA absent: one error line
    return load_model(folder, device=device, dtype=resolve_dtype(args.dtype, device), adapter=args.adapter,
                      kernels=args.kernels, progress=LoadProgress(stderr), quantize=args.quantize,
                      group_size=args.group_size)


# ---- answering ------------------------------------------------------------------------------------------

class OutputError(Exception):
    """stdout cannot take the answer (a full disk, /dev/full, a closed descriptor). Not a KomtError: the
    chat loop must not catch it and go on writing to nowhere."""


def emit(stdout: TextIO, text: str) -> None:
    """Write and flush `text`; a failed write is an OutputError (a closed pipe stays BrokenPipeError)."""
    try:
        stdout.write(text)
        stdout.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as err:  # ValueError: "I/O operation on closed file"
        raise OutputError(getattr(err, "strerror", None) or str(err)) from None


def check_utf8(text: str, what: str) -> str:
    """`text` unchanged if it is valid Unicode; else a GenerationError naming the first bad byte.

    Bytes that are not UTF-8 reach Python as lone surrogates (argv, and stdin as `main` reconfigures it,
    use "surrogateescape"); the tokenizer would fail on them with a traceback.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = ord(text[err.start])
        what_char = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"lone surrogate U+{char:04X}"
        raise GenerationError(f"{what} is not valid UTF-8 ({what_char} at character {err.start}); "
                              "pass UTF-8 text") from None
    return text


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k or None,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "compile_mode": None if args.compile == "off" else args.compile,
    }


def stream_answer(model, tokenizer, prompt_ids: Sequence[int], args: argparse.Namespace, fmt,
                  stdout: TextIO, stderr: TextIO) -> str:
    """Stream one answer to stdout (flushed per piece), then the stats line to stderr; return the text."""
    from komt.generate.generation import GenerationStats, stream_text

    stats = GenerationStats()
    pieces = []
    stream = stream_text(model, tokenizer, prompt_ids, stop=args.stop, stats=stats, **sampling_kwargs(args))
    try:
        for piece in stream:
            pieces.append(piece)
            emit(stdout, piece)
    except KeyboardInterrupt:
        stream.close()
        emit(stdout, "\n")
        stderr.write(f"[interrupted; {stats.summary()}, prompt format {fmt.label}]\n")
        raise
    emit(stdout, "\n")
    stderr.write(f"[{stats.summary()}, prompt format {fmt.label}]\n")
    stderr.flush()
    return "".join(pieces)


def fit_history(fmt, messages: list[dict], context: int, max_new_tokens: int = 0) -> list[int]:
    """Ids of the conversation in the prompt format `fmt`; drops the oldest exchanges (in place) until the
    prompt and the answer's max_new_tokens fit the context."""
    while True:
        ids = fmt.chat(messages)
        if len(ids) + max_new_tokens <= context or len(messages) <= 1:
            break
        del messages[:2]  # the oldest user message and its answer
    check_context_length(len(ids), max_new_tokens, context, what="the message", limit="--max-new-tokens")
    return ids


def chat(model, tokenizer, fmt, context: int, args: argparse.Namespace,
         stdin: TextIO | None, stdout: TextIO, stderr: TextIO, first: str | None = None) -> int:
    """The interactive loop: `> ` prompt, history in the prompt format `fmt`, /reset, /exit, Ctrl-D.

    `first` (from --prompt) is the first message, answered before stdin is read; a closed stdin then
    ends the chat like Ctrl-D.
    """
    interactive = stdin is not None and stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    stderr.write("komt chat: /reset clears the history, /exit or Ctrl-D quits\n")
    messages: list[dict] = []
    while True:
        try:
            if first is not None:
                line, first = first, None
            elif stdin is None:
                raise EOFError
            elif interactive:
                line = input("> ")
            else:
                stderr.write("> ")
                stderr.flush()
                line = stdin.readline()
                if not line:
                    raise EOFError
        except EOFError:
            stderr.write("\n")
            return 0
        except KeyboardInterrupt:
            stderr.write("\n")
            return 130
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            messages.clear()
            stderr.write("(history cleared)\n")
            continue
        try:
            check_utf8(text, "the message")
        except KomtError as err:
            stderr.write(f"error: {err}\n")
            continue
        messages.append({"role": "user", "content": text})
        try:
            ids = fit_history(fmt, messages, context, args.max_new_tokens)
            answer = stream_answer(model, tokenizer, ids, args, fmt, stdout, stderr)
        except KomtError as err:
            messages.pop()
            stderr.write(f"error: {err}\n")
            continue
        except KeyboardInterrupt:  # stop this answer, keep chatting
            messages.pop()
            stderr.write("(interrupted)\n")
            continue
        if answer.strip():
            messages.append({"role": "assistant", "content": answer})
        else:
            messages.pop()  # an empty answer cannot be a turn of the history


# ---- entry point ----------------------------------------------------------------------------------------

def run(args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """Everything after argument parsing; raises KomtError for bad input."""
    from komt.generate.prompt import prompt_format
    from komt.generate.vocab import check_tokenizer_fits

    want_chat = args.chat or (args.prompt is None and stdin is not None and stdin.isatty())
    prompt = args.prompt
    if want_chat and prompt is None and stdin is None:
        raise GenerationError("--chat reads messages from stdin, which is closed; give it a terminal or a pipe")
    if not want_chat:
        if prompt is None:
            if stdin is None:
                raise GenerationError("no prompt: stdin is closed; pass --prompt TEXT or pipe text to stdin")
            prompt = stdin.read()
        if not prompt.strip():
            raise GenerationError("the prompt is empty: pass --prompt TEXT, pipe text to stdin, or use --chat")
    if prompt is not None:
        check_utf8(prompt, "--prompt" if args.prompt is not None else "stdin")
    for stop in args.stop:
        check_utf8(stop, "--stop")
    folder, tokenizer, config = open_checkpoint(args)
    check_tokenizer_fits(tokenizer.vocab_size, config.vocab_size, tokenizer.source, stderr)
    fmt = prompt_format(tokenizer, args.prompt_format)
    context = config.max_position_embeddings
    ids = None
    if not want_chat:
        ids = fmt.prompt(prompt.strip())
        check_context_length(len(ids), args.max_new_tokens, context, limit="--max-new-tokens")
    model = load_requested_model(args, folder, stderr)
    raise_on_interrupt()  # loaded: from here Ctrl-C stops an answer (and its stats line prints)
    if want_chat:
        first = prompt.strip() if prompt is not None and prompt.strip() else None
        return chat(model, tokenizer, fmt, context, args, stdin, stdout, stderr, first=first)
    stream_answer(model, tokenizer, ids, args, fmt, stdout, stderr)
    return 0


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null, so the interpreter's last flush of the unwritable stdout does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad flags: usage line + exit 2 (argparse)
    if sys.stdout is None:  # started with `>&-`
        print("error: stdout is closed; redirect it to a file or /dev/null", file=sys.stderr)
        return 2
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # bad bytes reach check_utf8, not a traceback
    try:
        return run_entry_point(lambda: run(args, sys.stdin, sys.stdout, sys.stderr))  # bad input: 2, Ctrl-C: 130
    except OutputError as err:
        print(f"error: cannot write the answer to stdout: {err}", file=sys.stderr)
        _silence_stdout()
        return 2
    except BrokenPipeError:  # `... | head`: the reader left; say nothing
        _silence_stdout()
        return 0
