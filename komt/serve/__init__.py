"""An OpenAI-compatible HTTP server over komt's generation, with continuous batching and a chat page.

    python -m komt.serve --model ./komt-mistral-7b-v1        # then open http://127.0.0.1:8000/

`Engine` (komt.serve.engine) owns the model and batches concurrent requests: a `Scheduler`
(komt.serve.scheduler) over a `Runner` (komt.serve.runner) over a block-paged KV cache with prefix
caching (komt.serve.blocks, komt.generate.paged_cache). `create_app` (komt.serve.app) puts OpenAI's routes
in front of it, `server_config` (komt.serve.connections) bounds its connections, and
`python -m komt.serve.loadtest` measures it.
FastAPI and uvicorn are the optional `serve` extra: pip install 'komt[serve]'.
"""

from komt.lazy_exports import lazy_exports

# Imported on first use (komt.lazy_exports): `python -m komt.serve` reaches its Ctrl-C handler before torch.
__getattr__, __dir__ = lazy_exports(__name__, {
    "create_app": "komt.serve.app",
    "server_config": "komt.serve.connections",
    **{name: "komt.serve.engine" for name in ("Delta", "Engine", "Failed", "Finished", "QueueFull")},
    "ServerMetrics": "komt.serve.metrics",
})

__all__ = ["Delta", "Engine", "Failed", "Finished", "QueueFull", "ServerMetrics", "create_app", "server_config"]
