"""`python -m komt.serve --model M`: load a model, start the batching engine, serve HTTP with uvicorn.

A thin shell over `Engine` and `create_app`: parse flags, load, serve. Bad input (a missing checkpoint, a
bad flag value, the `serve` extra not installed) prints `error: <message>` and exits 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from komt.errors import ConfigError, KomtError

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
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV cache rows)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row; beyond: HTTP 429")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a request may take, queueing included (0: no limit)")
    parser.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", help="fp32, bf16 or fp16 (default: the checkpoint's)")
    parser.add_argument("--quantize", choices=("int8", "int4"), help="quantize the linear layers while loading")
    parser.add_argument("--group-size", type=int, help="quantization group size (int8: per channel; int4: 32)")
    parser.add_argument("--model-name", help="the name /v1/models reports (default: the folder name)")
    parser.add_argument("--prefill-chunk", type=int, default=512,
                        help="longest prompt piece prefilled at once with a sliding window (sets cache size)")
    parser.add_argument("--max-body-bytes", type=int, default=None, help="request body limit (default 2 MiB)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flag values the server cannot run with, naming the flag."""
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_queue < 0:
        raise ConfigError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.timeout < 0:
        raise ConfigError(f"--timeout must be >= 0 seconds (0: no limit), got {args.timeout}")
    if args.prefill_chunk < 1:
        raise ConfigError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if args.max_body_bytes is not None and args.max_body_bytes < 1024:
        raise ConfigError(f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted."""
    check_flags(args)
    from komt.serve.app import (
        DEFAULT_MAX_BODY_BYTES,
        create_app,
        require_serve_dependencies,
    )

    require_serve_dependencies()  # before minutes of loading, not after
    import torch
    import uvicorn

    from komt import load_model, load_tokenizer
    from komt.serve.engine import Engine

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # (on the CPU, load_model gives a lone request's decode steps all cores: komt.model.cpu_layouts)
    model = load_model(args.model, device=device, dtype=args.dtype, adapter=args.adapter,
                       quantize=args.quantize, group_size=args.group_size)
    tokenizer = load_tokenizer(args.tokenizer or model.source_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                          f"{model.config.vocab_size}; pass the model's own --tokenizer")
    name = args.model_name or Path(model.source_path).name
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk)
    app = create_app(engine, model_name=name, api_key=api_key, timeout=args.timeout or None,
                     max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES)
    if not is_loopback(args.host) and not api_key:
        print(f"komt: warning: serving on {args.host} without an API key: anyone who can reach it can use it "
              f"(set --api-key or ${API_KEY_ENV})", file=sys.stderr)
    print(f"komt: serving {name} on {device} at http://{args.host}:{args.port}/ (max batch {args.max_batch}, "
          f"kernels {model.kernels})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return serve(args)
    except KomtError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
