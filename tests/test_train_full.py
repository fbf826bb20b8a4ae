"""Full fine-tuning (komt/train/full.py) for real: 2 gloo processes under torchrun shard the model with FSDP2 and
train exactly like 1 process with the same global batch; a run SIGKILLed mid-way resumes from its DCP checkpoint,
on 2 processes or on 1, to the same curve; the exported folder loads with komt.load_model and gives the trained
model's logits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_checkpoint
from training_runs import environment, metrics
import torch

import komt
from komt.generate.tokenizer import load_tokenizer
from komt.model import Transformer, preset
from komt.model.safetensors_file import SafetensorsFile
from komt.train import TrainConfig, distributed, train
from komt.train.full import FullWeights
from komt.train.schedule import cosine_with_warmup
from komt.train.sft import SFTObjective
from komt.train.trainer import train_step

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
STEPS = 10
FLAGS = ["--full", "--device", "cpu", "--max-steps", str(STEPS), "--lr", "1e-3", "--warmup-steps", "1",
         "--save-every", "2", "--seed", "3", "--eval-split", "0.2", "--eval-every", "2"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("full")
    torch.manual_seed(0)
    base = write_checkpoint(Transformer(preset("tiny-mistral-32k", **SHAPE)), folder / "base", tokenizer=True)
    records = [{"instruction": f"문제 {i}{'?' * i}", "output": "정답은 " + "가나다라"[: i % 4 + 1]} for i in range(10)]
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return base, data


def command(base: Path, data: Path, output: Path, nproc: int, *extra: str) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    return [sys.executable, *launcher, "-m", "komt.train", "--model", str(base), "--data", str(data), "--output",
            str(output), *FLAGS, "--batch-size", str(4 // nproc), *extra]


def assert_same_curve(got: list[dict], want: list[dict], tolerance: float = 3e-5) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, STEPS + 1))
    for name in ("loss", "eval_loss"):
        assert [m.get(name) for m in got] == pytest.approx([m.get(name) for m in want], abs=tolerance), name


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    sa, sb = komt.load_model(a).state_dict(), komt.load_model(b).state_dict()
    assert sa.keys() == sb.keys()
    worst = max((sa[k] - sb[k]).abs().max().item() for k in sa)
    assert worst <= atol, f"weights differ by {worst}"


@pytest.fixture(scope="module")
def two_process_run(setup, tmp_path_factory) -> Path:
    """An uninterrupted 2-process FSDP2 run (with activation checkpointing, which must change nothing)."""
    base, data = setup
    out = tmp_path_factory.mktemp("two") / "run"
    result = subprocess.run(command(base, data, out, 2, "--grad-checkpointing"), env=environment(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sharded over 2 processes with FSDP2" in result.stderr
    return out


def test_one_process_full_run_trains_every_weight_and_exports_what_it_trained(setup, tmp_path):
    """In process, so the trained model itself is at hand: its logits equal the exported folder's exactly."""
    base, data = setup
    config = TrainConfig(model=str(base), data=str(data), output=str(tmp_path / "out"), full=True, batch_size=4,
                         lr=1e-3, warmup_steps=0, device="cpu")
    ctx = distributed.DistContext(0, 1, torch.device("cpu"))
    objective = SFTObjective.from_config(config, load_tokenizer(base), None)
    weights = FullWeights(config, ctx, None)
    model = weights.load(base, 32000)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    optimizer = torch.optim.AdamW(weights.param_groups(model), lr=config.lr)
    scheduler = cosine_with_warmup(optimizer, 0, 2)
    for step in range(2):
        train_step(model, weights.forward_fn(model), objective, weights, objective.train_set[4 * step:][:4],
                   optimizer, scheduler, config, ctx)
    out = tmp_path / "out"
    out.mkdir()
    weights.save_final(out, model)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    exported, plain = komt.load_model(out), komt.load_model(base)
    ids = torch.arange(40).view(2, 20) * 797 % 32000
    with torch.no_grad():
        trained = model.eval()(ids)
        assert torch.equal(exported(ids), trained)
    changed = {n for n, p in exported.state_dict().items() if not torch.equal(p, plain.state_dict()[n])}
    assert changed == set(plain.state_dict())  # every weight trained, norms and embeddings included
    assert load_tokenizer(out).vocab_size == 32000


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_sharded_export_gives_the_sharded_models_logits(setup, tmp_path, tied):
    base, data = setup
    if tied:  # tiny-llama ties lm_head to the embedding: both must stay one sharded parameter
        base = tmp_path / "tiny-llama"
        subprocess.run(["cp", "-a", str(ROOT / "tests" / "fixtures" / "tiny-llama"), str(base)], check=True)
        subprocess.run(["cp", str(ROOT / "tests" / "fixtures" / "tiny-tokenizer" / "tokenizer.model"), str(base)],
                       check=True)
    out, result = tmp_path / "export", tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "fsdp_export_check.py"), str(base), str(data), str(out), str(result)]
    run = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(result.read_text())
    assert report["max_diff"] <= 1e-6 and report["base_diff"] > 1e-3, report  # equal to the trained, not the base
    assert report["tied"] == tied
    files = ["config.json", "model.safetensors", "tokenizer.model"]
    assert report["files"] == (files[:1] + ["generation_config.json"] + files[1:] if tied else files)
    if tied:
        assert "lm_head.weight" not in SafetensorsFile(out / "model.safetensors").keys()


@pytest.mark.slow
def test_two_fsdp_processes_train_like_one_with_the_same_global_batch(setup, tmp_path, two_process_run):
    base, data = setup
    assert sorted(p.name for p in (two_process_run / "checkpoint-8").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "trainer_state.pt"]  # one shard file per process
    one = train(TrainConfig(model=str(base), data=str(data), output=str(tmp_path / "one"), full=True, batch_size=4,
                            device="cpu", max_steps=STEPS, lr=1e-3, warmup_steps=1, save_every=2, seed=3,
                            eval_split=0.2, eval_every=2), log=None)
    assert_same_curve(metrics(two_process_run), metrics(one))
    assert_same_weights(two_process_run, one)
    assert komt.load_model(one).state_dict()["model.norm.weight"].ne(1).any()  # it trained


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the torchrun workers (each in a session of its own), then torchrun: the whole job at once."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    proc.kill()
    proc.wait(timeout=60)


@pytest.mark.slow
def test_sigkilled_fsdp_run_resumes_to_the_same_curve_on_two_or_one_process(setup, tmp_path, two_process_run):
    base, data = setup
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(base, data, killed, 2), env=environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and len(metrics(killed)) < 5:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    kill_job(proc)
    logged = len(metrics(killed))
    newest = max(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))
    assert not (killed / "config.json").exists() and newest < logged < STEPS

    elsewhere = tmp_path / "killed-then-one-process"
    subprocess.run(["cp", "-a", str(killed), str(elsewhere)], check=True)
    for folder, nproc in ((killed, 2), (elsewhere, 1)):
        resumed = subprocess.run(command(base, data, folder, nproc, "--resume"), env=environment(),
                                 capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        assert f"resuming from {folder / f'checkpoint-{newest}'} (step {newest})" in resumed.stderr
        assert_same_curve(metrics(folder), metrics(two_process_run))
        assert_same_weights(folder, two_process_run)


@pytest.mark.slow
def test_full_dpo_on_two_processes_equals_one(tmp_path):
    """DPO's reference scoring and eval run in lockstep on a sharded model (uneven shares included)."""
    fixtures = ROOT / "tests" / "fixtures"
    base = tmp_path / "base"
    subprocess.run(["cp", "-a", str(fixtures / "tiny-mistral"), str(base)], check=True)
    subprocess.run(["cp", str(fixtures / "tiny-tokenizer" / "tokenizer.model"), str(base)], check=True)
    outputs = {}
    for nproc in (2, 1):
        out = tmp_path / f"dpo-{nproc}"
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if nproc == 2 else []
        cmd = [sys.executable, *launcher, "-m", "komt.train", "dpo", "--full", "--model", str(base), "--data",
               str(fixtures / "dpo" / "prefs.jsonl"), "--output", str(out), "--device", "cpu", "--batch-size",
               str(2 // nproc), "--max-steps", "5", "--lr", "1e-3", "--warmup-steps", "1", "--eval-split", "0.2",
               "--eval-every", "2", "--seed", "1"]
        run = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-4000:]
        outputs[nproc] = metrics(out)
    for name in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "eval_loss", "eval_rewards/margins"):
        got, want = [m.get(name) for m in outputs[2]], [m.get(name) for m in outputs[1]]
        assert got == pytest.approx(want, abs=1e-4 if "logps" in name else 1e-5), name
    assert outputs[1][-1]["rewards/accuracies"] == 1.0


@pytest.mark.cuda
def test_full_fine_tuning_on_cuda_trains_and_exports_bf16(setup, tmp_path):
    """One process on CUDA: fp32 master weights under bf16 autocast; the export is in --dtype auto = bf16."""
    base, data = setup
    out = train(TrainConfig(model=str(base), data=str(data), output=str(tmp_path / "run"), full=True, batch_size=4,
                            device="cuda", max_steps=8, lr=1e-3, warmup_steps=0, grad_checkpointing=True), log=None)
    m = metrics(out)
    assert m[-1]["loss"] < m[0]["loss"]
    exported = komt.load_model(out)
    assert {p.dtype for p in exported.parameters()} == {torch.bfloat16}
