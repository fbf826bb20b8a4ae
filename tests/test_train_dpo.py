"""DPO end to end (komt/train/dpo.py): komt's ids, log-probs and step-1 metrics equal trl's DPOTrainer on the same
data and weights (pinned in tests/fixtures/dpo/expected.json by baselines/dpo_reference_trl.py), training on a toy
preference set drives rewards/accuracies to 1, and the run resumes after SIGKILL and trains the same on 2 processes."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_runs import environment, metrics, sigkill_after

import komt
from komt.errors import ConfigError
from komt.generate.tokenizer import load_tokenizer
from komt.model.lora import lora_disabled
from komt.model.safetensors_file import SafetensorsFile
from komt.train import DPOConfig, train
from komt.train.cli import build_dpo_parser, config_from_args, main
from komt.train.dpo import pair_logps
from komt.train.preference_data import load_preferences
from komt.train.merge import merge_adapter

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
PREFS = FIXTURES / "dpo" / "prefs.jsonl"
EXPECTED = json.loads((FIXTURES / "dpo" / "expected.json").read_text(encoding="utf-8"))
SETTINGS = EXPECTED["settings"]  # max_prompt_length 16, max_length 32, beta 0.1: truncation is exercised

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """tiny-mistral with the 1000-piece tokenizer (it fits the 1024-token vocabulary), and the reference trl
    used: tiny-mistral + tiny-mistral-lora, merged (komt's merge equals PEFT's, tests/test_train_merge.py)."""
    root = tmp_path_factory.mktemp("dpo")
    base = root / "base"
    shutil.copytree(FIXTURES / "tiny-mistral", base)
    shutil.copy(FIXTURES / "tiny-tokenizer" / "tokenizer.model", base / "tokenizer.model")
    reference = merge_adapter(base, FIXTURES / "tiny-mistral-lora", root / "reference", log=None)
    return base, reference


def dpo(base: Path, output: Path, **overrides) -> list[dict]:
    settings = dict(max_steps=1, batch_size=6, grad_accum=1, warmup_steps=0, lr=1e-2, seed=0,
                    max_prompt_length=SETTINGS["max_prompt_length"], max_length=SETTINGS["max_length"],
                    beta=SETTINGS["beta"])
    settings.update(overrides)
    train(DPOConfig(model=str(base), data=str(PREFS), output=str(output), **settings), log=None)
    return metrics(output)


def test_ids_are_those_of_the_independent_reference_formatting_and_trl_truncation():
    tok = load_tokenizer(FIXTURES / "tiny-tokenizer")
    pairs = load_preferences(PREFS, tok, SETTINGS["max_prompt_length"], SETTINGS["max_length"]).pairs
    got = [{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in pairs]
    assert got == EXPECTED["ids"]
    assert any(len(p.prompt) == SETTINGS["max_prompt_length"] and p.prompt[0] != tok.bos_id for p in pairs)  # cut


def test_response_logps_equal_transformers_per_pair(folders):
    base, reference = folders
    pairs = load_preferences(PREFS, load_tokenizer(base), SETTINGS["max_prompt_length"], SETTINGS["max_length"]).pairs
    for folder, key in ((base, "policy"), (reference, "reference")):
        model = komt.load_model(folder)
        with torch.no_grad():
            chosen, rejected = pair_logps(model, pairs, torch.device("cpu"), pad_id=2)
        want = torch.tensor(EXPECTED["per_pair_logps"][key])  # (6, 2)
        assert torch.allclose(torch.stack([chosen, rejected], dim=1), want, atol=1e-4, rtol=0), key


@pytest.mark.parametrize("loss_type, full", [("sigmoid", False), ("ipo", False), ("sigmoid", True)])
def test_step_one_metrics_equal_trls_dpo_trainer(folders, tmp_path, loss_type, full):
    base, reference = folders
    first = dpo(base, tmp_path / "run", ref_model=str(reference), loss_type=loss_type, full=full)[0]
    want = EXPECTED["trl_step1"][loss_type]
    for name, value in want.items():
        tolerance = 1e-4 if name.startswith("logps") else 1e-5 * max(1.0, abs(value))
        assert first[name] == pytest.approx(value, abs=tolerance), name
    assert 0 < first["loss"] != pytest.approx(math.log(2))  # the reference differs from the policy


def test_own_reference_starts_at_log_2_and_training_drives_accuracy_to_one(folders, tmp_path):
    base, _ = folders
    out = tmp_path / "run"
    m = dpo(base, out, max_steps=12, lr=2e-2)
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference (LoRA B = 0)
    assert m[0]["rewards/chosen"] == pytest.approx(0, abs=1e-6) and m[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert [r["rewards/accuracies"] for r in m[-5:]] == [1.0] * 5
    assert m[-1]["loss"] < 0.5 and m[-1]["rewards/margins"] > m[len(m) // 2]["rewards/margins"] > 0
    cached = torch.load(out / "ref_logps.pt", weights_only=True)
    assert torch.allclose(cached["chosen"].float(), torch.tensor(
        [r[0] for r in EXPECTED["per_pair_logps"]["policy"]]), atol=1e-4)  # the base's logps, as trl computed
    # The saved adapter prefers every chosen response over its rejected one, against the base.
    pairs = load_preferences(PREFS, load_tokenizer(base), SETTINGS["max_prompt_length"], SETTINGS["max_length"]).pairs
    model = komt.load_model(base, adapter=out)
    with torch.no_grad():
        tuned = pair_logps(model, pairs, torch.device("cpu"), 2)
        with lora_disabled(model):
            plain = pair_logps(model, pairs, torch.device("cpu"), 2)
    assert ((tuned[0] - plain[0]) > (tuned[1] - plain[1])).all()


def test_defaults_are_the_komt_dpo_recipe_and_bad_flags_are_one_line_errors(capsys):
    config = config_from_args(build_dpo_parser().parse_args(["--model", "m", "--data", "d", "--output", "o"]))
    assert isinstance(config, DPOConfig) and config.lora_targets == ("q_proj", "k_proj", "v_proj")
    assert (config.lora_r, config.lora_alpha, config.lora_dropout, config.lr, config.warmup_steps) == (8, 16, 0.05, 5e-4, 100)
    assert (config.weight_decay, config.batch_size, config.grad_accum, config.beta) == (0.05, 8, 4, 0.1)
    assert (config.max_prompt_length, config.max_length, config.loss_type, config.label_smoothing) == (512, 1024, "sigmoid", 0)
    for flags, message in ((["--beta", "0"], "argument --beta: must be a number in (0, inf)"),
                           (["--loss-type", "hinge"], "argument --loss-type: invalid choice: 'hinge'"),
                           (["--label-smoothing", "0.5"], "argument --label-smoothing: must be a number in [0, 0.5)"),
                           (["--max-prompt-length", "1024"], "--max-prompt-length (1024) must be less than --max-length (1024)"),
                           (["--loss-type", "ipo", "--label-smoothing", "0.1"], "applies to the sigmoid loss only"),
                           (["--max-seq-len", "9"], "unrecognized arguments: --max-seq-len 9")):
        assert main(["dpo", "--model", "m", "--data", "d", "--output", "o", *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_bad_preference_file_is_one_line_error_before_anything_is_written(folders, tmp_path, capsys):
    base, _ = folders
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a", "rejected": "a"}\n')
    out = tmp_path / "out"
    assert main(["dpo", "--model", str(base), "--data", str(bad), "--output", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == f"error: {bad}:2: 'chosen' and 'rejected' are the same response: the pair expresses no preference"
    assert not out.exists()
    with pytest.raises(ConfigError, match="must be less than --max-length"):
        DPOConfig(model="m", data="d", output="o", max_prompt_length=64, max_length=64)


# --- the loop's guarantees, for DPO too -------------------------------------------------------------------

def command(base: Path, output: Path, *extra: str) -> list[str]:
    # dropout stays on (the recipe's 0.05): a resumed run must restore the RNG that draws its masks
    return [sys.executable, "-m", "komt.train", "dpo", "--model", str(base), "--data", str(PREFS), "--output",
            str(output), "--max-steps", "16", "--save-every", "4", "--batch-size", "2", "--grad-accum", "1",
            "--lr", "1e-2", "--warmup-steps", "2", "--seed", "5", "--eval-split", "0.2", "--eval-every", "4", *extra]


def assert_same_adapter(a: Path, b: Path, atol: float) -> None:
    fa, fb = SafetensorsFile(a / "adapter_model.safetensors"), SafetensorsFile(b / "adapter_model.safetensors")
    assert fa.keys() == fb.keys()
    for key in fa.keys():
        assert torch.allclose(fa.tensor(key), fb.tensor(key), atol=atol, rtol=0), key
    assert max(fa.tensor(k).abs().max().item() for k in fa.keys() if "lora_B" in k) > 1e-3  # it trained


@pytest.mark.slow
def test_sigkilled_dpo_run_resumes_to_the_uninterrupted_adapter(folders, tmp_path):
    base, _ = folders
    straight = tmp_path / "straight"
    subprocess.run(command(base, straight), env=environment(), check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    sigkill_after(command(base, killed), killed, steps=6)
    assert not (killed / "adapter_model.safetensors").exists() and (killed / "checkpoint-4").is_dir()
    resumed = subprocess.run(command(base, killed, "--resume"), env=environment(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "reference log-probs read from" in resumed.stderr  # not scored again
    assert_same_adapter(straight, killed, atol=1e-6)
    want, got = metrics(straight), metrics(killed)
    assert [m["step"] for m in got] == list(range(1, 17))
    for name in ("loss", "rewards/margins", "logps/chosen", "eval_loss"):
        assert [m.get(name) for m in got] == pytest.approx([m.get(name) for m in want], abs=1e-5), name


@pytest.mark.slow
def test_two_processes_train_dpo_like_one_with_the_same_global_batch(folders, tmp_path):
    base, _ = folders
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *command(base, two, "--batch-size", "1", "--lora-dropout", "0", "--device", "cpu")[1:]]
    result = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "global batch 2 = 1 x 1 accumulation x 2 process(es)" in result.stderr
    one = tmp_path / "one"
    subprocess.run(command(base, one, "--lora-dropout", "0", "--device", "cpu"), env=environment(), check=True,
                   capture_output=True, timeout=300)
    assert_same_adapter(two, one, atol=1e-5)
    m2, m1 = metrics(two), metrics(one)
    for name in ("loss", "rewards/chosen", "rewards/accuracies", "logps/rejected", "eval_loss", "eval_rewards/margins"):
        assert [m.get(name) for m in m2] == pytest.approx([m.get(name) for m in m1], abs=1e-5), name


@pytest.mark.cuda
def test_dpo_on_cuda_under_bf16_autocast_matches_trl_loosely_and_learns(folders, tmp_path):
    """The GPU path (bf16 base, fp32 LoRA, bf16 autocast): step 1 within bf16 noise of trl's fp32 figures."""
    base, reference = folders
    first = dpo(base, tmp_path / "ref", ref_model=str(reference), device="cuda")[0]
    want = EXPECTED["trl_step1"]["sigmoid"]
    assert first["loss"] == pytest.approx(want["loss"], abs=5e-3)
    assert first["logps/chosen"] == pytest.approx(want["logps/chosen"], rel=2e-2)
    m = dpo(base, tmp_path / "own", max_steps=12, lr=2e-2, device="cuda", grad_checkpointing=True)
    assert m[-1]["rewards/accuracies"] == 1.0 and m[-1]["loss"] < 0.6
