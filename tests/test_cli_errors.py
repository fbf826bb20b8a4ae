"""The entry points under hostile conditions: one `error: ...` line and exit 2, or 130 for Ctrl-C; never a
traceback. Real subprocesses, because the conditions are the process's own (closed descriptors, /dev/full,
bytes that are not UTF-8 in argv, a SIGINT while torch imports).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import komt
from conftest import write_checkpoint
from komt.generate import cli, generate
from komt.generate.prompt import format_chat, prompt_format, format_prompt
from komt.generate.tokenizer import load_tokenizer
from komt.model import Transformer, preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random tiny Mistral with the real tokenizer's 32000 ids and its tokenizer.model; context 4096."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny-mistral-32k")).eval().requires_grad_(False)
    return write_checkpoint(model, tmp_path_factory.mktemp("cli") / "model", tokenizer=True)


def child_env(**extra: str) -> dict[str, str]:
    """This environment without TRITON_INTERPRET (a kernel test may have set it for this process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KOMT_KERNELS")}
    return env | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])} | extra


def shell(command: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """`command` under bash, where `<&-` and `>&-` close the descriptors for real."""
    return subprocess.run(["bash", "-c", command], capture_output=True, cwd=ROOT, timeout=timeout,
                          env=child_env(**env))


GEN = f"{sys.executable} -m komt.generate --max-new-tokens 3 --device cpu"


@pytest.mark.parametrize(
    "command, env, message",
    [
        ("{gen} --model {ckpt} <&-", {}, "no prompt: stdin is closed; pass --prompt TEXT or pipe text to stdin"),
        ("{gen} --model {ckpt} --chat <&-", {},
         "--chat reads messages from stdin, which is closed; give it a terminal or a pipe"),
        ("printf 'caf\\xe9 au lait\\n' | {gen} --model {ckpt}", {},
         "stdin is not valid UTF-8 (byte 0xe9 at character 3); pass UTF-8 text"),
        ("{gen} --model {ckpt} --prompt \"$(printf 'caf\\xe9')\"", {},
         "--prompt is not valid UTF-8 (byte 0xe9 at character 3); pass UTF-8 text"),
        ("{gen} --model {ckpt} --prompt hi --stop \"$(printf '\\xff')\"", {},
         "--stop is not valid UTF-8 (byte 0xff at character 0); pass UTF-8 text"),
        ("{gen} --model {ckpt} --prompt hi > /dev/full", {}, "cannot write the answer to stdout: No space left on device"),
        ("{gen} --model {ckpt} --prompt hi >&-", {}, "stdout is closed; redirect it to a file or /dev/null"),
        ("{gen} --model {ckpt} --prompt hi --kernels triton", {},
         "kernels triton (from --kernels or KOMT_KERNELS) needs a CUDA device, not cpu; use torch kernels on the CPU"),
        ("{gen} --model {ckpt} --prompt hi", {"KOMT_KERNELS": "triton"},
         "kernels triton (from --kernels or KOMT_KERNELS) needs a CUDA device, not cpu; use torch kernels on the CPU"),
        ("{gen} --model {ckpt} --prompt hi --device gpu0", {}, "unknown device 'gpu0'; use cpu, cuda or cuda:N"),
        ("{gen} --model {ckpt} --prompt hi --max-new-tokens 5000", {},
         "the prompt has {n} tokens and --max-new-tokens is 5000: together past the model's context of 4096; "
         "use --max-new-tokens {room} or less"),
    ],
    ids=["stdin-closed", "chat-stdin-closed", "stdin-not-utf8", "prompt-not-utf8", "stop-not-utf8", "stdout-dev-full",
         "stdout-closed", "kernels-triton-on-cpu", "env-kernels-triton-on-cpu", "device-gpu0", "past-the-context"],
)
def test_generate_cli_error_is_one_line_exit_2(checkpoint, command, env, message):
    result = shell(command.format(gen=GEN, ckpt=checkpoint), **env)
    assert result.returncode == 2, result.stderr.decode(errors="replace")
    n = len(format_prompt(load_tokenizer(checkpoint), "hi"))  # <s>[INST]hi [/INST]
    assert result.stderr.decode() == f"error: {message.format(n=n, room=4096 - n)}\n"
    assert result.stdout == b""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the behaviour of a machine without CUDA")
@pytest.mark.parametrize("module", ["komt.generate --model {ckpt} --prompt hi", "komt.generate.bench --cuda-graphs"])
def test_cuda_on_a_machine_without_it_is_one_line_exit_2(checkpoint, module):
    result = shell(f"{sys.executable} -m {module.format(ckpt=checkpoint)} --device cuda")
    assert result.returncode == 2
    assert result.stderr.decode() == "error: device cuda: CUDA is not available on this machine; use cpu\n"


def test_bench_cuda_graphs_on_the_cpu_is_refused():
    result = shell(f"{sys.executable} -m komt.generate.bench --device cpu --cuda-graphs")
    assert result.returncode == 2
    assert result.stderr.decode() == "error: --cuda-graphs needs a CUDA device, not cpu; use --compile on the CPU\n"


@pytest.mark.parametrize("delay", [0.2, 0.6, 1.0, 1.6])
def test_sigint_during_start_up_exits_130_without_a_traceback(checkpoint, delay):
    """SIGINT at points spread over start-up: torch's import, loading, the first tokens (all 130; the
    first ~50 ms, before any komt code runs, are Python's own start and out of reach).
    (Before, a SIGINT inside torch's or triton's imports gave a traceback, exit 0 with the interrupt
    swallowed, or a SIGABRT.)"""
    child = subprocess.Popen([sys.executable, "-m", "komt.generate", "--model", str(checkpoint), "--prompt", "hi",
                              "--max-new-tokens", "4000", "--device", "cpu"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=child_env())
    time.sleep(delay)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err.decode(errors="replace")
    assert b"Traceback" not in err and b"Exception ignored" not in err, err.decode(errors="replace")


def _torch_is_loading(pid: int) -> bool:
    """True once torch's shared libraries are mapped into the process: its import is under way."""
    try:
        return "/torch/lib/" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


# Each entry point with arguments it would get past parsing with (it is interrupted long before using them).
ENTRY_POINTS = {
    "serve": ["komt.serve", "--model", "{ckpt}", "--device", "cpu", "--port", "0"],
    "train": ["komt.train", "--model", "{ckpt}", "--data", "{tmp}/data.jsonl", "--output", "{tmp}/run",
              "--max-steps", "1"],
    "eval": ["komt.eval", "--model", "{ckpt}", "--perplexity", "{tmp}/text.txt"],
    "quantize": ["komt.quantize", "{ckpt}", "{tmp}/int8", "--bits", "8"],
    "export": ["komt.export", "gguf", "{ckpt}", "{tmp}/model.gguf"],
}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps (Linux)")
@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_sigint_while_an_entry_point_imports_torch_exits_130_without_a_traceback(checkpoint, tmp_path, name):
    """SIGINT the moment torch's libraries are being loaded, the most fragile part of start-up (before
    komt.interrupts was wired into these entry points: a KeyboardInterrupt traceback out of the import)."""
    args = [a.format(ckpt=checkpoint, tmp=tmp_path) for a in ENTRY_POINTS[name]]
    child = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             cwd=ROOT, env=child_env())
    deadline = time.monotonic() + 60
    while not _torch_is_loading(child.pid) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err.decode(errors="replace")
    assert b"Traceback" not in err and b"Exception ignored" not in err, err.decode(errors="replace")


# ---- --chat --prompt, and the context rule in a chat ------------------------------------------------------

def _main(args, stdin_text, monkeypatch):
    stdin, stdout, stderr = io.StringIO(stdin_text), io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    return cli.main(args), stdout.getvalue(), stderr.getvalue()


def test_chat_prompt_is_the_first_message(checkpoint, monkeypatch):
    status, out, err = _main(["--model", str(checkpoint), "--chat", "--prompt", "안녕하세요", "--max-new-tokens", "5",
                              "--temperature", "0", "--device", "cpu"], "제주도는?\n", monkeypatch)
    assert status == 0, err
    model, tokenizer = komt.load_model(checkpoint), load_tokenizer(checkpoint)

    def answer(messages):
        return tokenizer.decode(generate(model, format_chat(tokenizer, messages), max_new_tokens=5,
                                         eos_id=tokenizer.eos_id))

    first = answer([{"role": "user", "content": "안녕하세요"}])
    second = answer([{"role": "user", "content": "안녕하세요"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "제주도는?"}])
    assert out.splitlines() == [first, second]


def test_chat_history_is_dropped_to_make_room_for_max_new_tokens(tok):
    messages = [{"role": "user", "content": "안녕하세요 " * 5}, {"role": "assistant", "content": "네 " * 5},
                {"role": "user", "content": "제주도"}]
    full = len(format_chat(tok, messages))
    last = len(format_chat(tok, messages[2:]))
    kept = list(messages)
    fmt = prompt_format(tok, "card")  # komt's own: the Mistral chat format of format_chat
    assert cli.fit_history(fmt, kept, context=full + 10, max_new_tokens=10) == format_chat(tok, messages)
    assert len(kept) == 3
    cli.fit_history(fmt, kept, context=full + 10, max_new_tokens=11)  # one token short: the oldest pair goes
    assert kept == messages[2:]
    with pytest.raises(komt.GenerationError, match=f"the message has {last} tokens and --max-new-tokens is 20: together"):
        cli.fit_history(fmt, kept, context=last + 10, max_new_tokens=20)


def test_help_states_the_context_rule(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "the prompt plus N must fit the model's context, else it is an error" in help_text
    assert "(with --chat: the chat's first message)" in help_text
