"""`python -m komt.generate` end to end on a tiny random checkpoint with the real Mistral tokenizer.

A random model emits random tokens; to see Korean come out deterministically the test model is rigged so
that every Hangul piece of the vocabulary outscores every other token: channel 0 of the residual stream is
a constant (every embedding has 20 there and no layer writes to it), and lm_head reads it with +1 for the
346 pieces made only of Hangul syllables and -1 for the rest. Which Hangul pieces come out, and in what
order, is still up to the random weights. So the Korean test shows the whole text path (Korean prompt ->
ids -> model -> sampler -> streaming detokenizer -> UTF-8 stdout) delivers Hangul intact, not that the
model speaks Korean. The greedy and chat tests pin the CLI's output to the library's by value.
"""

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import komt
from conftest import FIXTURES, write_checkpoint
from komt.generate import cli
from komt.generate.generation import generate
from komt.generate.prompt import format_chat, format_prompt, prompt_format
from komt.generate.tokenizer import load_tokenizer
from komt.model import Transformer, preset

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "제주도를 1박2일로 혼자 여행하려고 하는데 여행 코스를 만들어줘"
HANGUL_TEXT = re.compile(r"[\uac00-\ud7a3 ]+")


def _hangul_ids(tokenizer) -> list[int]:
    ids = []
    for i in range(tokenizer.vocab_size):
        text = tokenizer.id_to_piece(i).replace("\u2581", "")
        if text and all("\uac00" <= c <= "\ud7a3" for c in text):
            ids.append(i)
    return ids


def build_hangul_model(max_positions: int = 4096) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(preset("tiny-mistral-32k", max_position_embeddings=max_positions)).eval()
    hangul = _hangul_ids(load_tokenizer(FIXTURES / "tokenizer" / "tokenizer.model"))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 20.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.lm_head.weight[:, 0] = -1.0
        model.lm_head.weight[hangul, 0] = 1.0
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(build_hangul_model(), tmp_path_factory.mktemp("hangul") / "model", tokenizer=True)


@pytest.fixture(scope="module")
def short_context_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("short") / "model"
    return write_checkpoint(build_hangul_model(max_positions=16), folder, tokenizer=True)


def _run(args, stdin_text=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "komt.generate", *args], input=stdin_text, capture_output=True,
                          text=True, encoding="utf-8", cwd=ROOT, timeout=timeout)


def _main(args, stdin_text="", monkeypatch=None):
    """Run the CLI in this process with the given stdin; returns (status, stdout, stderr)."""
    stdin, stdout, stderr = io.StringIO(stdin_text), io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    status = cli.main(args)
    return status, stdout.getvalue(), stderr.getvalue()


def test_korean_prompt_in_korean_text_out(checkpoint):
    result = _run(["--model", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "12", "--seed", "0",
                   "--device", "cpu"])
    assert result.returncode == 0, result.stderr
    answer = result.stdout.strip()
    assert HANGUL_TEXT.fullmatch(answer), answer
    assert "\ufffd" not in result.stdout
    stats = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"\[prompt \d+ tokens, 12 new tokens, first token [\d.]+ s, prefill [\d.]+ tok/s, "
                        r"decode [\d.]+ tok/s, prompt format card\]", stats), stats
    again = _run(["--model", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "12", "--seed", "0",
                  "--device", "cpu"])
    assert again.stdout == result.stdout  # same seed, same text


def test_greedy_output_is_the_library_generation(checkpoint, monkeypatch):
    status, out, err = _main(["--model", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "9",
                              "--temperature", "0", "--device", "cpu"], monkeypatch=monkeypatch)
    assert status == 0, err
    tokenizer = load_tokenizer(checkpoint)
    model = komt.load_model(checkpoint)
    ids = generate(model, format_prompt(tokenizer, PROMPT), max_new_tokens=9, eos_id=tokenizer.eos_id)
    assert out == tokenizer.decode(ids) + "\n"


def test_chat_keeps_history_and_resets(checkpoint, monkeypatch):
    """Three turns piped to --chat: turn 2 sees turn 1 (Mistral chat format), turn 3 follows /reset."""
    lines = "안녕하세요\n제주도 여행 코스를 알려줘\n/reset\n서울은?\n/exit\n"
    status, out, err = _main(["--model", str(checkpoint), "--chat", "--max-new-tokens", "5", "--temperature", "0",
                              "--device", "cpu"], stdin_text=lines, monkeypatch=monkeypatch)
    assert status == 0, err
    answers = out.splitlines()
    assert len(answers) == 3 and all(HANGUL_TEXT.fullmatch(a) for a in answers)
    assert err.count("> ") == 5 and "(history cleared)" in err  # one prompt per line read

    model, tokenizer = komt.load_model(checkpoint), load_tokenizer(checkpoint)

    def answer(messages):
        ids = generate(model, format_chat(tokenizer, messages), max_new_tokens=5, eos_id=tokenizer.eos_id)
        return tokenizer.decode(ids)

    first = answer([{"role": "user", "content": "안녕하세요"}])
    second = answer([{"role": "user", "content": "안녕하세요"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "제주도 여행 코스를 알려줘"}])
    third = answer([{"role": "user", "content": "서울은?"}])
    assert answers == [first, second, third]


def test_chat_ends_at_end_of_input(checkpoint):
    result = _run(["--model", str(checkpoint), "--chat", "--max-new-tokens", "3", "--device", "cpu"],
                  stdin_text="안녕\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1


def test_prompt_from_piped_stdin(checkpoint, monkeypatch):
    status, out, err = _main(["--model", str(checkpoint), "--max-new-tokens", "4", "--temperature", "0",
                              "--device", "cpu"], stdin_text=PROMPT + "\n", monkeypatch=monkeypatch)
    assert status == 0, err
    status2, out2, _ = _main(["--model", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "4",
                              "--temperature", "0", "--device", "cpu"], monkeypatch=monkeypatch)
    assert out == out2 and HANGUL_TEXT.fullmatch(out.strip())


def test_stop_string_cuts_the_answer(checkpoint, monkeypatch):
    args = ["--model", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "0",
            "--device", "cpu"]
    _, full, _ = _main(args, monkeypatch=monkeypatch)
    stop = full.strip()[4:6]
    _, cut, _ = _main(args + ["--stop", stop], monkeypatch=monkeypatch)
    assert cut == full[: full.index(stop)] + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model", "--prompt", "hi"], "error: /nonexistent/model: no such folder"),
        (["--prompt", "   "], "error: the prompt is empty"),
    ],
)
def test_bad_input_is_one_error_line(args, message, monkeypatch):
    status, out, err = _main(args, monkeypatch=monkeypatch)
    assert status == 2 and out == ""
    assert err.strip() == err.strip().splitlines()[0] and err.startswith(message), err


def test_prompt_longer_than_the_context_is_an_error(short_context_checkpoint, monkeypatch):
    status, out, err = _main(["--model", str(short_context_checkpoint), "--prompt", PROMPT, "--device", "cpu"],
                             monkeypatch=monkeypatch)
    assert status == 2 and out == ""
    assert re.fullmatch(r"error: the prompt has \d+ tokens; the model's context is 16 tokens \(shorten it\)\n", err), err


def test_missing_tokenizer_is_an_error(checkpoint, tmp_path, monkeypatch):
    status, _, err = _main(["--model", str(checkpoint), "--prompt", "hi", "--tokenizer", str(tmp_path / "none.model")],
                           monkeypatch=monkeypatch)
    assert status == 2 and err.startswith("error: ") and "none.model does not exist" in err


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--temperature", "-0.5", "argument --temperature: must be a number in [0, inf), got '-0.5'"),
        ("--top-p", "0", "argument --top-p: must be a number in (0, 1], got '0'"),
        ("--top-p", "1.5", "argument --top-p: must be a number in (0, 1], got '1.5'"),
        ("--top-k", "-3", "argument --top-k: must be a non-negative integer, got '-3'"),
        ("--max-new-tokens", "0", "argument --max-new-tokens: must be a positive integer, got '0'"),
        ("--temperature", "hot", "argument --temperature: must be a number in [0, inf), got 'hot'"),
        ("--repetition-penalty", "nan", "argument --repetition-penalty: must be a number in (0, inf), got 'nan'"),
        ("--unknown-flag", "1", "unrecognized arguments: --unknown-flag 1"),
    ],
)
def test_invalid_flags_exit_2_with_usage(flag, value, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--prompt", "hi", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m komt.generate") and message in err, err


def test_errors_at_the_real_entry_point_have_no_traceback():
    result = _run(["--model", "/nonexistent/model", "--prompt", "hi"])
    assert result.returncode == 2
    assert result.stderr == "error: /nonexistent/model: no such folder\n"


def test_progress_bar_for_large_checkpoints():
    stream = io.StringIO()
    progress = cli.LoadProgress(stream, min_bytes=100)
    for done in range(0, 1001, 50):
        progress(done, 1000)
    lines = stream.getvalue().splitlines()
    assert [re.search(r"(\d+)%", line).group(1) for line in lines] == ["0", "25", "50", "75", "100"]
    assert lines[-1].startswith("loading weights [" + "#" * 30 + "] 100%") and lines[-1].endswith(" s")
    quiet = io.StringIO()
    small = cli.LoadProgress(quiet, min_bytes=10_000)
    small(500, 1000)
    small(1000, 1000)
    assert quiet.getvalue() == ""


# ---- a checkpoint with a tokenizer.json and a chat template (SmolLM2's tokenizer files) -------------------

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Mistral with SmolLM2's 49152-token vocabulary, tokenizer.json and ChatML template."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny-mistral-32k", vocab_size=49152)).eval()
    folder = write_checkpoint(model, tmp_path_factory.mktemp("smol") / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(FIXTURES / "smollm2-tokenizer" / name, folder)
    return folder


@pytest.mark.parametrize("flag", [[], ["--prompt-format", "template"], ["--prompt-format", "card"],
                                  ["--prompt-format", "raw"]])
def test_prompt_format_frames_the_prompt_and_is_named(smol_checkpoint, monkeypatch, flag):
    status, out, err = _main(["--model", str(smol_checkpoint), "--prompt", QUESTION, "--max-new-tokens", "6",
                              "--temperature", "0", "--device", "cpu", *flag], monkeypatch=monkeypatch)
    assert status == 0, err
    tokenizer = load_tokenizer(smol_checkpoint)
    fmt = prompt_format(tokenizer, flag[1] if flag else "auto")
    ids = generate(komt.load_model(smol_checkpoint), fmt.prompt(QUESTION), max_new_tokens=6, eos_id=tokenizer.stop_ids)
    assert out == tokenizer.decode(ids) + "\n"
    name = flag[1] if flag else "template"
    assert f", prompt format {name}" in err and (name != "template" or "chat_template.jinja" in err)
    assert re.fullmatch(r"\[prompt \d+ tokens, \d+ new tokens, .* tok/s, prompt format .*\]", err.strip().splitlines()[-1])


def test_chat_with_a_template_keeps_history_in_the_template(smol_checkpoint, monkeypatch):
    status, out, err = _main(["--model", str(smol_checkpoint), "--chat", "--max-new-tokens", "4", "--temperature", "0",
                              "--device", "cpu"], stdin_text="hi\nWhat next?\n", monkeypatch=monkeypatch)
    assert status == 0, err
    model, tokenizer = komt.load_model(smol_checkpoint), load_tokenizer(smol_checkpoint)
    fmt = prompt_format(tokenizer)

    def answer(messages):
        return tokenizer.decode(generate(model, fmt.chat(messages), max_new_tokens=4, eos_id=tokenizer.stop_ids))

    first = answer([{"role": "user", "content": "hi"}])
    assert first.strip()  # (else the CLI would drop it from the history)
    second = answer([{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "What next?"}])
    assert out == f"{first}\n{second}\n" and ", prompt format template (" in err


def test_komts_own_checkpoint_keeps_the_card_format(checkpoint, monkeypatch):
    status, _, err = _main(["--model", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "2", "--device", "cpu"],
                           monkeypatch=monkeypatch)
    assert status == 0 and ", prompt format card]\n" in err


def test_template_format_without_a_template_is_one_error_line(checkpoint, monkeypatch):
    status, out, err = _main(["--model", str(checkpoint), "--prompt", "hi", "--prompt-format", "template"],
                             monkeypatch=monkeypatch)
    assert status == 2 and out == "" and err.startswith("error: ") and "ships no chat template" in err
    assert len(err.strip().splitlines()) == 1
