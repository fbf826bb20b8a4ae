# Baseline only (never a dependency of komt): run in the llama-cpp-python venv, e.g.
#   /work/venv-llama/bin/python baselines/llamacpp_server.py MODEL.gguf [--port 8001] [--threads 2]
#   python -m komt.serve.loadtest --url http://127.0.0.1:8001 --scenario all      # then, from komt's python
# llama-cpp-python's OpenAI-compatible server on a GGUF, on 127.0.0.1, so the same load test measures it as
# it measures komt (the same model file once komt serves GGUF: SmolLM2-135M-Instruct.Q4_1.gguf, HELPERS.md).
# Its server runs one request at a time (queued: `interrupt_requests` off, else each new request cuts the
# running one short), streams no `usage` (the load test then counts text chunks), and
# keeps the last prompt's KV itself, so the load test's "cold" second chat turn (a fresh cache_salt, which
# it ignores) is not cold there.
import argparse
import importlib.util
import sys

from llamacpp_logits import _without_extra_buffer_types  # the weights as stored: repacked ones segfault here

SERVER_DEPENDENCIES = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


def main() -> int:
    parser = argparse.ArgumentParser(description="llama-cpp-python's OpenAI server on a GGUF, on 127.0.0.1")
    parser.add_argument("gguf")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=4096)
    args = parser.parse_args()
    missing = [name for name in SERVER_DEPENDENCIES if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: llama_cpp.server needs {', '.join(missing)}: {sys.executable} -m pip install "
              "uvicorn fastapi sse-starlette 'starlette-context>=0.3.6,<0.4' pydantic-settings PyYAML", file=sys.stderr)
        return 2
    _without_extra_buffer_types()
    from llama_cpp.server.__main__ import main as serve

    sys.argv = ["llama_cpp.server", "--model", args.gguf, "--host", "127.0.0.1", "--port", str(args.port),
                "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", str(args.n_ctx),
                # by default a new request interrupts the one running (each concurrent client got a few tokens)
                "--interrupt_requests", "False"]
    serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
