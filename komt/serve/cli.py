"""`python -m komt.serve --model M`: load a model, start the batching engine, serve HTTP with uvicorn.

A thin shell over `Engine` and `create_app`: parse flags, load, serve. Bad input (a missing checkpoint, the
`serve` extra not installed) prints `error: <message>` and exits 2 (a bad flag value: argparse's usage
line, also 2); Ctrl-C while it starts is 130 (komt/serve/__main__.py), once serving uvicorn's shutdown.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from komt.argtypes import integer, non_negative_int, number, positive_int
from komt.entry_point import run_entry_point
from komt.interrupts import raise_on_interrupt
from komt.model.dtypes import DTYPE_CHOICES
from komt.model.quantized_linear import QUANTIZE_CHOICES
from komt.serve.connections import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_CONNECTIONS,
)

API_KEY_ENV = "KOMT_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m komt.serve",
        description="An OpenAI-compatible server (chat/completions, streaming, continuous batching) and chat page.",
    )
    parser.add_argument("--model", required=True, help="checkpoint folder or Hugging Face hub id")
    parser.add_argument("--adapter", help="a PEFT LoRA adapter folder to apply")
    parser.add_argument("--tokenizer", help="tokenizer.model or its folder (default: the model's folder)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=integer(0, 65535), default=8000)
    parser.add_argument("--max-batch", type=positive_int, default=8, help="requests running at once")
    parser.add_argument("--max-queue", type=non_negative_int, default=64,
                        help="requests waiting beyond those; beyond: HTTP 429")
    parser.add_argument("--max-num-batched-tokens", type=positive_int, default=None,
                        help="tokens per step, prefill chunks and decode tokens together (default 2048 on CUDA, "
                             "32 on the CPU): smaller keeps running streams smoother while long prompts arrive")
    parser.add_argument("--max-model-len", type=positive_int, default=None,
                        help="longest prompt + answer served (default: the model's context)")
    parser.add_argument("--kv-cache-tokens", type=positive_int, default=None, help="KV cache size in tokens")
    parser.add_argument("--kv-cache-fraction", type=number(0, 1, low_open=True), default=None,
                        help="KV cache size as a fraction of the memory free after loading (default 0.9 on CUDA, "
                             "0.25 on the CPU, there at most max batch x max model len)")
    parser.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV cache block")
    parser.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the KV blocks of prompt prefixes seen before (default on)")
    parser.add_argument("--compile", choices=("default", "reduce-overhead"), default=None,
                        help="torch.compile the decode step (reduce-overhead: CUDA graphs, one per batch size)")
    parser.add_argument("--timeout", type=number(0), default=600.0,
                        help="seconds a request may take, queueing included (0: no limit)")
    parser.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="auto (default): bf16 on CUDA, the checkpoint's dtype on the CPU")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="quantize the linear layers while loading")
    parser.add_argument("--group-size", type=positive_int, help="quantization group size (int8: per channel; int4: 32)")
    parser.add_argument("--model-name", help="the name /v1/models reports (default: the folder name)")
    parser.add_argument("--max-body-bytes", type=integer(1024), default=None, help="request body limit (default 2 MiB)")
    parser.add_argument("--allowed-hosts", default=None,
                        help="comma-separated Host names requests may carry, '*' for any (default: the loopback "
                             "names, plus --host when it is a specific address; any for 0.0.0.0)")
    parser.add_argument("--max-connections", type=positive_int, default=DEFAULT_MAX_CONNECTIONS,
                        help="open connections at most; beyond: 503 (uvicorn's limit_concurrency)")
    parser.add_argument("--timeout-keep-alive", type=number(0, low_open=True), default=DEFAULT_KEEP_ALIVE_S,
                        help="seconds an idle keep-alive connection stays open")
    parser.add_argument("--header-timeout", type=number(0, low_open=True), default=DEFAULT_HEADER_TIMEOUT_S,
                        help="seconds a connection may take to send a request's headers (the body has "
                             f"{DEFAULT_BODY_TIMEOUT_S:g} s)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, flag: str | None) -> tuple[str, ...] | None:
    """The Host names to accept (None: any): the flag's list, or the names this bind address is reached by."""
    from komt.serve.app import LOOPBACK_HOSTS

    if flag is not None:
        names = tuple(h.strip() for h in flag.split(",") if h.strip())
        return None if "*" in names else names
    if host in ("0.0.0.0", "::", ""):
        return None  # every interface: the names are not known here (an API key is what protects it)
    return LOOPBACK_HOSTS if is_loopback(host) else (host, *LOOPBACK_HOSTS)


def serve(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted."""
    from komt.serve.app import (
        DEFAULT_MAX_BODY_BYTES,
        create_app,
        require_serve_dependencies,
    )

    require_serve_dependencies()  # before minutes of loading, not after
    import uvicorn

    from komt import load_model, load_tokenizer
    from komt.generate.vocab import check_tokenizer_fits
    from komt.model.device import requested_device
    from komt.model.dtypes import resolve_dtype
    from komt.serve.connections import server_config
    from komt.serve.engine import Engine

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    device = requested_device(args.device)
    # (on the CPU, load_model gives a lone request's decode steps all cores: komt.model.cpu_layouts)
    model = load_model(args.model, device=device, dtype=resolve_dtype(args.dtype, device), adapter=args.adapter,
                       quantize=args.quantize, group_size=args.group_size)
    tokenizer = load_tokenizer(args.tokenizer or model.source_path)
    check_tokenizer_fits(tokenizer.vocab_size, model.config.vocab_size, tokenizer.source)
    name = args.model_name or Path(model.source_path).name
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                    max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                    kv_cache_tokens=args.kv_cache_tokens, kv_cache_fraction=args.kv_cache_fraction,
                    max_model_len=args.max_model_len, prefix_caching=args.prefix_caching, compile_mode=args.compile)
    app = create_app(engine, model_name=name, api_key=api_key, timeout=args.timeout or None,
                     max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
                     allowed_hosts=allowed_hosts(args.host, args.allowed_hosts))
    if not is_loopback(args.host) and not api_key:
        print(f"komt: warning: serving on {args.host} without an API key: anyone who can reach it can use it "
              f"(set --api-key or ${API_KEY_ENV})", file=sys.stderr)
    print(f"komt: serving {name} on {device} at http://{args.host}:{args.port}/ (max batch {args.max_batch}, "
          f"{engine.chunk} tokens a step, KV cache {engine.blocks.capacity} blocks of {engine.block_size} tokens, "
          f"kernels {model.kernels})", file=sys.stderr)
    config = server_config(app, host=args.host, port=args.port, log_level=args.log_level,
                           max_connections=args.max_connections, keep_alive=args.timeout_keep_alive,
                           header_timeout=args.header_timeout)
    raise_on_interrupt()  # loaded: uvicorn takes Ctrl-C over for a graceful shutdown
    uvicorn.Server(config).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_entry_point(lambda: serve(args))
