"""What `--output` already holds, and so what a run may do with it, decided before anything is loaded.

    empty or absent                       a fresh run (--resume: error, nothing to resume)
    files komt did not write              refused: --output ./some-model would overwrite someone's files
    a finished run (its final weights)    --resume: "nothing to do", exit 0; otherwise refused
    a run with checkpoints                --resume continues from the newest; otherwise refused
    a run killed before its first one     taken over from step 0, with or without --resume: nothing
                                          trained was saved, so nothing is lost

A folder is a run of ours when its train_config.json carries `"written_by": "komt.train"` (or has the
fields komt wrote before the marker existed), or when it holds complete checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from komt.errors import ConfigError, KomtError
from komt.jsonutil import read_json
from komt.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from komt.train.checkpoint import list_checkpoints
from komt.train.config import RUN_MARKER
from komt.model.checkpoint_writer import TOKENIZER_FILES
from komt.train.progress import METRICS_FILE, read_metrics

TRAIN_CONFIG = "train_config.json"
# What a run writes at the top of --output (LoRA: the adapter; full: a checkpoint folder).
WRITTEN = (TRAIN_CONFIG, METRICS_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS, "loss_curve.png", "ref_logps.pt",
           "config.json", "model.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES)
_OLD_CONFIG_KEYS = {"model", "data", "output", "lora_r", "save_every"}  # train_config.json before the marker


@dataclass(frozen=True)
class RunFolder:
    resume_from: Path | None = None  # the checkpoint to continue from
    finished_steps: int | None = None  # set when the folder holds a finished run
    taken_over: bool = False  # a run of ours killed before its first checkpoint, started again


def inspect_output(output: Path, resume: bool, settings: dict | None = None) -> RunFolder:
    """Decide what to do with `output` (see module docstring); ConfigError when it must not be touched.

    `settings` (the run's train_config.json dict) is compared with a finished run's, so that --resume with
    other settings is an error rather than "nothing to do"."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file, not a folder")
    checkpoints = list_checkpoints(output)
    ours = bool(checkpoints) or is_our_run(output)
    if not ours:
        clashing = [name for name in WRITTEN if (output / name).exists()] + sorted(
            p.name for p in output.glob("model-*-of-*.safetensors"))
        if clashing:
            raise ConfigError(f"--output {output} holds {', '.join(clashing)}, which no komt run wrote; choose "
                              "a new folder (komt will not overwrite them)")
        if resume:
            raise ConfigError(f"--resume: no checkpoint in {output} (one is written every --save-every steps)")
        return RunFolder()
    if is_finished(output):
        steps = last_step(output)
        if resume:
            if settings is not None:
                check_finished_settings(output, settings)
            return RunFolder(finished_steps=steps)
        raise ConfigError(f"--output {output} already holds a finished training run ({steps} steps); choose a "
                          "new folder")
    if checkpoints:
        if not resume:
            raise ConfigError(f"--output {output} already holds a training run (newest: {checkpoints[-1][1].name}); "
                              "pass --resume to continue it or choose a new folder")
        return RunFolder(resume_from=checkpoints[-1][1])
    return RunFolder(taken_over=True)


# train_config.json fields that may change between a run and its --resume (paths, where it runs, how often
# it saves); any other difference means another run.
_MAY_DIFFER = {"written_by", "model", "data", "output", "tokenizer", "ref_model", "resume", "device", "save_every",
               "save_total_limit", "eval_every", "grad_checkpointing"}


def read_train_config(path: Path) -> dict | None:
    """A train_config.json as a dict; None when it is absent or not a JSON object (a run from before the
    file, someone else's file, a file cut short), which the callers each treat as "not known to be ours"."""
    try:
        raw = read_json(path)  # strict, and a FIFO is refused rather than opened
    except (OSError, KomtError):
        return None
    return raw if isinstance(raw, dict) else None


def check_finished_settings(output: Path, now: dict) -> None:
    """--resume of a finished run with other settings (e.g. more steps) cannot continue it: say so."""
    saved = read_train_config(output / TRAIN_CONFIG)
    if saved is None:
        return  # a finished run from before train_config.json: nothing to compare
    for key in sorted((set(saved) | set(now)) - _MAY_DIFFER):
        if saved.get(key) != now.get(key):
            raise ConfigError(f"--resume: {output} is a finished run trained with {key} {saved.get(key)!r}, this "
                              f"run has {now.get(key)!r}; a finished run cannot be continued, choose a new folder")


def is_our_run(output: Path) -> bool:
    raw = read_train_config(output / TRAIN_CONFIG)
    return raw is not None and (raw.get("written_by") == RUN_MARKER or _OLD_CONFIG_KEYS <= raw.keys())


def is_finished(output: Path) -> bool:
    """The final weights are in place: a whole adapter (LoRA) or config.json (full; written last)."""
    adapter = (output / ADAPTER_CONFIG).is_file() and (output / ADAPTER_WEIGHTS).is_file()
    return adapter or (output / "config.json").is_file()


def last_step(output: Path) -> int:
    records = read_metrics(output / METRICS_FILE)
    return max((r.get("step", 0) for r in records if isinstance(r.get("step"), int)), default=0)
