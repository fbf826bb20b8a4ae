#!/usr/bin/env bash
# llama-cpp-python's OpenAI-compatible server on a GGUF, on 127.0.0.1, for the same load test as komt's:
#
#   baselines/llamacpp_server.sh MODEL.gguf [PORT] [THREADS]        # default port 8001, 2 threads
#   python -m komt.serve.loadtest --url http://127.0.0.1:8001 --scenario all
#
# Runs from the throwaway venv (LLAMA_PYTHON, default /work/venv-llama/bin/python; komt never imports
# llama_cpp). Its server serves one request at a time and caches the last prompt's KV itself, so the
# load test's "cold" second chat turn (a fresh cache_salt, which it ignores) is not cold there.
# The same model file for komt: SmolLM2-135M-Instruct.Q4_1.gguf (see /work/HELPERS.md), once komt loads GGUF.
#
# N_UBATCH=1 (environment) sets llama.cpp's physical batch to one token: on the project's 2-core VM
# (2026-12), the llama.cpp build in /work/venv-llama dies with SIGSEGV in llama_decode on any prompt
# evaluated two or more tokens at a time (also outside the server; the CPU reports AMX), and evaluates
# prompts token by token without crashing. Figures taken that way understate its prefill speed: say so.
set -euo pipefail
MODEL=${1:?usage: baselines/llamacpp_server.sh MODEL.gguf [PORT] [THREADS]}
PORT=${2:-8001}
THREADS=${3:-2}
PY=${LLAMA_PYTHON:-/work/venv-llama/bin/python}
if ! "$PY" -c "import llama_cpp.server.app, uvicorn, sse_starlette, starlette_context, pydantic_settings" 2>/dev/null; then
    echo "error: $PY cannot run llama_cpp.server; install its server dependencies:" \
         "$PY -m pip install uvicorn fastapi sse-starlette starlette-context pydantic-settings" >&2
    exit 2
fi
[ -f "$MODEL" ] || { echo "error: no GGUF file at $MODEL" >&2; exit 2; }
exec "$PY" -m llama_cpp.server --model "$MODEL" --host 127.0.0.1 --port "$PORT" --n_threads "$THREADS" \
    --n_threads_batch "$THREADS" --n_ctx 4096 ${N_UBATCH:+--n_ubatch "$N_UBATCH"}
