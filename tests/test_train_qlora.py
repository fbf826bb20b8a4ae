"""QLoRA (`--base-quantize int8|int4|nf4`): LoRA trained over a frozen quantized base.

Pinned here against references, not snapshots: the loss and every LoRA gradient equal those of LoRA over the
*dense* base holding the dequantized weights (same init), with and without activation checkpointing; only the
LoRA matrices train and reach the adapter files; merging folds the adapter into the dequantized base, so the
merged checkpoint's logits equal the quantized base + adapter's (not the original weights + adapter's); the
nf4 inference path (`load_model(quantize="nf4")`) is F.linear on the dequantized weights; DPO's reference is the
quantized base; a SIGKILLed run resumes to the same adapter and refuses another base quantization; DDP.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, write_checkpoint
from training_runs import environment, metrics, sigkill_after
import torch
import torch.nn.functional as F
from torch import nn

import komt
from komt.errors import CheckpointError, ConfigError
from komt.generate.tokenizer import load_tokenizer
from komt.model import Transformer, preset
from komt.model.lora import count_parameters, inject_lora, lora_modules
from komt.model.nf4 import NF4Linear, dequantize_nf4, quantize_nf4
from komt.model.quantized_linear import Int4Linear, Int8Linear, QuantizedLinear, QuantizeSpec
from komt.model.safetensors_file import SafetensorsFile
from komt.train import DPOConfig, TrainConfig, train
from komt.train.batching import collate
from komt.train.cli import build_dpo_parser, build_train_parser, config_from_args, main
from komt.train.data import load_dataset
from komt.generate.prompt import prompt_format
from komt.train.distributed import DistContext
from komt.train.dpo import pair_logps
from komt.train.loss import token_loss_sum
from komt.train.lora_weights import LoRAWeights
from komt.train.merge import merge_adapter
from komt.train.preference_data import load_preferences
from komt.train.schedule import cosine_with_warmup
from komt.train.sft import SFTObjective
from komt.train.trainer import train_step

METHODS = ("int8", "int4", "nf4")
VARIANT = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear}
# The real 32000-token vocabulary (the tokenizer needs it); every input size a multiple of 64, so each method
# quantizes every projection (no int8 fallback) and the lm_head is int8 per channel, as load_model does.
SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
RECORDS = [{"instruction": f"질문 {i}: {'무엇' * (i % 3 + 1)}?", "output": f"답 {i}입니다." * (i % 2 + 1)}
           for i in range(8)]
PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.lora_[AB]\.weight$")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qlora") / "base"
    torch.manual_seed(0)
    write_checkpoint(Transformer(preset("tiny-mistral-32k", **SHAPE)), folder, tokenizer=True)
    return folder


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory) -> Path:
    """The same shape with the head tied to the embedding (as SmolLM2 and tiny-llama are)."""
    folder = tmp_path_factory.mktemp("qlora-tied") / "base"
    torch.manual_seed(1)
    write_checkpoint(Transformer(preset("tiny-mistral-32k", tie_word_embeddings=True, **SHAPE)), folder, tokenizer=True)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qlora-data") / "data.json"
    path.write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    return path


def config(base: Path, data: Path, output: Path, **overrides) -> TrainConfig:
    settings = dict(max_steps=4, batch_size=4, lr=1e-2, warmup_steps=1, save_every=1000, seed=0)
    settings.update(overrides)
    return TrainConfig(model=str(base), data=str(data), output=str(output), **settings)


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    f = SafetensorsFile(folder / "adapter_model.safetensors")
    return {k: f.tensor(k).clone() for k in f.keys()}


def logits(folder: Path, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return komt.load_model(folder, layout="plain", **kwargs)(ids)


# --- training: only LoRA trains, the loss falls, gradients equal the dequantized dense reference ----------

@pytest.mark.parametrize("method", METHODS)
def test_one_step_on_a_quantized_base_trains_only_the_lora_matrices(base, data, tmp_path, method):
    cfg = config(base, data, tmp_path / "run", base_quantize=method, lora_dropout=0.0)
    weights = LoRAWeights(cfg, DistContext(0, 1, torch.device("cpu")), None)
    model = weights.load(base, 32000)
    projections = {n: m.base_layer for n, m in lora_modules(model)}
    assert len(projections) == 7 * 2 and all(type(b) is VARIANT[method] for b in projections.values())
    assert type(model.lm_head) is Int8Linear and type(model.model.embed_tokens) is nn.Embedding
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)
    dense_total = count_parameters(komt.load_model(base, layout="plain"))[1]
    assert count_parameters(model) == (sum(p.numel() for p in model.parameters() if p.requires_grad),
                                       dense_total + sum(p.numel() for p in model.parameters() if p.requires_grad))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    examples = load_dataset(data, prompt_format(load_tokenizer(base), "auto"), 64).examples[:4]
    optimizer = torch.optim.AdamW(weights.param_groups(model), lr=1e-2)
    scheduler = cosine_with_warmup(optimizer, 0, 1)
    objective = SFTObjective(examples, [], pad_id=2)
    train_step(model, weights.forward_fn(model), objective, weights, examples, optimizer, scheduler, cfg,
               weights.ctx)
    for name, param in model.named_parameters():
        if name in frozen:
            assert param.grad is None and torch.equal(param, frozen[name]), name
    assert all(not torch.equal(dict(model.named_parameters())[n], lora_before[n]) for n in trainable
               if n.endswith("lora_B.weight"))  # B moved off zero


@pytest.mark.parametrize("method", METHODS)
def test_loss_falls_over_a_few_steps_and_the_adapter_holds_only_lora_tensors(base, data, tmp_path, method):
    log = io.StringIO()
    out = train(config(base, data, tmp_path / "run", base_quantize=method, max_steps=8, save_every=4), log=log)
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(1, 9))
    assert m[-1]["loss"] < m[0]["loss"] - 1.0
    assert f"base {method}" in log.getvalue()
    for folder in (out, out / "checkpoint-4"):
        keys = SafetensorsFile(folder / "adapter_model.safetensors").keys()
        assert len(keys) == 2 * 7 * 2 and all(PEFT_KEY.match(k) for k in keys), keys
        peft = json.loads((folder / "adapter_config.json").read_text())
        assert peft["peft_type"] == "LORA" and peft["r"] == 8  # a plain PEFT adapter: nothing about the base
    assert json.loads((out / "train_config.json").read_text())["base_quantize"] == method
    assert torch.load(out / "checkpoint-4" / "trainer_state.pt", weights_only=True)["run"]["base_quantize"] == method


def dense_reference(quantized: nn.Module) -> nn.Module:
    """A plain dense model whose every linear weight is the quantized model's dequantized weight (fp32)."""
    reference = Transformer(quantized.config)
    state = {}
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedLinear):
            state[name + ".weight"] = module.dequantize(torch.float32)
    for name, param in quantized.named_parameters():
        owner = quantized.get_submodule(name.rpartition(".")[0])
        if not isinstance(owner, QuantizedLinear):
            state[name] = param.detach()
    reference.load_state_dict(state, strict=True)
    return reference.requires_grad_(False)


@pytest.mark.parametrize("grad_checkpointing", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_loss_and_lora_gradients_equal_lora_on_the_dequantized_dense_base(base, data, tmp_path, method,
                                                                          grad_checkpointing):
    """The quantized layer's backward (dx against the dequantized weight, no dense copy kept) is the dense
    layer's: every LoRA gradient, down to layer 0's, which needs dL/dx through all the frozen layers above."""
    cfg = config(base, data, tmp_path / "run", base_quantize=method, lora_dropout=0.0,
                 grad_checkpointing=grad_checkpointing)
    quantized = LoRAWeights(cfg, DistContext(0, 1, torch.device("cpu")), None).load(base, 32000)
    reference = dense_reference(komt.load_model(base, layout="plain", quantize=method))
    torch.manual_seed(cfg.seed)  # the init LoRAWeights.load uses
    inject_lora(reference, cfg.lora, lora_dtype=torch.float32)
    reference.train()
    generator = torch.Generator().manual_seed(5)
    for (name, q), (_, r) in zip(lora_modules(quantized), lora_modules(reference)):
        assert torch.equal(q.lora_A.weight, r.lora_A.weight), name  # the same init
        b = torch.randn(q.lora_B.weight.shape, generator=generator) * 0.05  # B != 0: A's gradients too
        with torch.no_grad():
            q.lora_B.weight.copy_(b)
            r.lora_B.weight.copy_(b)

    examples = load_dataset(data, prompt_format(load_tokenizer(base), "auto"), 64).examples[:4]
    input_ids, labels = collate(examples, 2)
    losses = []
    for model in (quantized, reference):
        loss = token_loss_sum(model(input_ids), labels) / (labels != -100).sum()
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for (name, q), (_, r) in zip(lora_modules(quantized), lora_modules(reference)):
        for which in ("lora_A", "lora_B"):
            gq, gr = getattr(q, which).weight.grad, getattr(r, which).weight.grad
            assert gr.abs().max() > 0, (name, which)
            torch.testing.assert_close(gq, gr, rtol=1e-4, atol=1e-7, msg=f"{name}.{which}")


def test_full_with_base_quantize_and_bad_values_are_one_line_errors(capsys):
    with pytest.raises(ConfigError, match="--full trains every weight, which cannot be held quantized"):
        TrainConfig(model="m", data="d", output="o", full=True, base_quantize="nf4")
    with pytest.raises(ConfigError, match=r"--base-quantize must be one of int8, int4, nf4"):
        TrainConfig(model="m", data="d", output="o", base_quantize="int3")
    for argv, message in ((["--full", "--base-quantize", "int8"], "--full trains every weight"),
                          (["--base-quantize", "fp8"], "argument --base-quantize: invalid choice: 'fp8'"),
                          (["dpo", "--full", "--base-quantize", "int4"], "--full trains every weight")):
        head = argv[:1] if argv[0] == "dpo" else []
        assert main([*head, "--model", "m", "--data", "d", "--output", "o", *argv[len(head):]]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    for parser in (build_train_parser(), build_dpo_parser()):
        args = ["--model", "m", "--data", "d", "--output", "o"]
        assert config_from_args(parser.parse_args(args)).base_quantize is None
        assert config_from_args(parser.parse_args([*args, "--base-quantize", "nf4"])).base_quantize == "nf4"
        text = parser.format_help()
        assert "8-bit base (int8)" in text and "--bits 4" in text and "means nf4" in text


# --- merging: into the dequantized base it was trained against ----------------------------------------

@pytest.fixture(scope="module")
def trained(base, data, tmp_path_factory) -> dict[str, Path]:
    """An adapter trained on each quantized base (4 steps: B well away from zero)."""
    root = tmp_path_factory.mktemp("qlora-trained")
    return {m: train(config(base, data, root / m, base_quantize=m, save_every=2), log=None) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_the_quantized_base_plus_adapter_not_the_original_base_plus_adapter(base, trained, tmp_path,
                                                                                         method, capsys):
    run = trained[method]
    assert main(["merge", "--model", str(base), "--adapter", str(run), "--output", str(tmp_path / "m")]) == 0
    assert f"(base held {method}, as trained)" in capsys.readouterr().err  # read from run/train_config.json
    out = tmp_path / "m"
    f = SafetensorsFile(out / "model.safetensors")
    assert {f.dtype(k) for k in f.keys()} == {torch.float32} and not any("lora_" in k or "scales" in k for k in f.keys())
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = torch.randint(0, 32000, (2, 12), generator=torch.Generator().manual_seed(0))
    merged = logits(out, ids)
    qlora = logits(base, ids, quantize=method, adapter=run)
    original = logits(base, ids, adapter=run)
    torch.testing.assert_close(merged, qlora, atol=2e-5, rtol=0)
    assert (merged - original).abs().max() > 100 * 2e-5  # the quantization error the adapter trained on


def test_merge_of_a_tied_model_writes_its_int8_head_untied(tied_base, data, tmp_path):
    run = train(config(tied_base, data, tmp_path / "run", base_quantize="nf4"), log=None)
    out = merge_adapter(tied_base, run, tmp_path / "merged", log=None)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in SafetensorsFile(out / "model.safetensors").keys()
    ids = torch.randint(0, 32000, (1, 10), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(out, ids), logits(tied_base, ids, quantize="nf4", adapter=run), atol=2e-5, rtol=0)


def test_merge_flag_overrides_what_the_run_recorded_and_checkpoints_read_their_run_folder(base, trained, tmp_path):
    run = trained["int4"]
    ids = torch.randint(0, 32000, (1, 9), generator=torch.Generator().manual_seed(2))
    log = io.StringIO()
    plain = merge_adapter(base, run, tmp_path / "plain", base_quantize=None, log=log)  # on purpose: PEFT's way
    assert "was trained on a base held int4" in log.getvalue() and "merging into the base as stored" in log.getvalue()
    torch.testing.assert_close(logits(plain, ids), logits(base, ids, adapter=run), atol=2e-5, rtol=0)
    step2 = merge_adapter(base, run / "checkpoint-2", tmp_path / "step2", log=None)  # run/train_config.json
    torch.testing.assert_close(logits(step2, ids), logits(base, ids, quantize="int4", adapter=run / "checkpoint-2"),
                               atol=2e-5, rtol=0)
    # A PEFT adapter (no train_config.json): the base as stored, unless told which quantization it trained on.
    peft = tmp_path / "peft"
    peft.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(run / name, peft / name)
    told = merge_adapter(base, peft, tmp_path / "told", base_quantize="int4", log=None)
    torch.testing.assert_close(logits(told, ids), logits(base, ids, quantize="int4", adapter=run), atol=2e-5, rtol=0)
    untold = merge_adapter(base, peft, tmp_path / "untold", log=None)
    torch.testing.assert_close(logits(untold, ids), logits(plain, ids), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="--base-quantize must be one of auto, none, int8, int4, nf4, got 'int3'"):
        merge_adapter(base, peft, tmp_path / "bad", base_quantize="int3", log=None)


@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
def test_qlora_on_cuda_under_bf16_autocast_learns_and_its_merge_is_the_quantized_base_plus_adapter(base, data,
                                                                                                 tmp_path, method):
    """The GPU path: bf16 embeddings and norms, int8/int4 through the Triton kernels, NF4 dequantized in torch."""
    out = train(config(base, data, tmp_path / "run", base_quantize=method, max_steps=8, device="cuda",
                       grad_checkpointing=True), log=None)
    m = metrics(out)
    assert m[-1]["loss"] < m[0]["loss"] - 1.0
    assert all(PEFT_KEY.match(k) for k in SafetensorsFile(out / "adapter_model.safetensors").keys())
    merged = merge_adapter(base, out, tmp_path / "merged", log=None)  # on the CPU, from the recorded method
    ids = torch.randint(0, 32000, (1, 10), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(logits(merged, ids), logits(base, ids, quantize=method, adapter=out), atol=2e-5, rtol=0)


# --- the nf4 inference path ------------------------------------------------------------------------------

def test_load_model_quantize_nf4_is_f_linear_on_the_dequantized_weights(base):
    model = komt.load_model(base, quantize="nf4", layout="plain")
    stored = SafetensorsFile(base / "model.safetensors")
    nf4 = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert len(nf4) == 7 * 2 and type(model.lm_head) is Int8Linear  # the head: int8 per channel, as for int4
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(0))
    for name, layer in nf4.items():
        want = dequantize_nf4(quantize_nf4(stored.tensor(name + ".weight")))  # the file's weight, quantized anew
        assert torch.equal(layer.dequantize(), want), name
        inputs = x[..., :layer.in_features]
        assert torch.equal(layer(inputs), F.linear(inputs, want)), name
    ids = torch.randint(0, 32000, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), dense_reference(model)(ids), atol=1e-5, rtol=0)
    auto = komt.load_model(base, quantize="nf4")  # the CPU layouts pass keeps NF4 layers as they are
    assert sum(isinstance(m, NF4Linear) for m in auto.modules()) == 14


def test_nf4_spec_checks_its_block_and_falls_back_to_int8_where_64_does_not_divide(capsys):
    with pytest.raises(ConfigError, match="nf4 quantizes in fixed blocks of 64; group_size 32"):
        QuantizeSpec("nf4", 32)
    assert QuantizeSpec("nf4", 64).block == 64 and QuantizeSpec("nf4").block == 64
    model = komt.load_model(FIXTURES / "tiny-mistral", quantize="nf4", layout="plain")  # intermediate 176
    assert type(model.model.layers[0].mlp.down_proj) is Int8Linear
    assert type(model.model.layers[0].mlp.up_proj) is NF4Linear
    assert "2 layers have an input size that nf4 blocks of 64 do not divide" in capsys.readouterr().err
    from komt.model.checkpoint_writer import write_checkpoint as write_folder

    with pytest.raises(CheckpointError, match="is an NF4 layer, which komt checkpoints cannot store"):
        write_folder(model, Path("/nonexistent"))


# --- DPO: the quantized base is its own reference ---------------------------------------------------------

DPO_EXPECTED = json.loads((FIXTURES / "dpo" / "expected.json").read_text(encoding="utf-8"))["settings"]


@pytest.fixture(scope="module")
def dpo_base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qlora-dpo") / "base"
    shutil.copytree(FIXTURES / "tiny-mistral", folder)
    shutil.copy(FIXTURES / "tiny-tokenizer" / "tokenizer.model", folder / "tokenizer.model")
    return folder


def dpo(base: Path, output: Path, **overrides) -> list[dict]:
    settings = dict(max_steps=1, batch_size=6, grad_accum=1, warmup_steps=0, lr=1e-2, seed=0,
                    max_prompt_length=DPO_EXPECTED["max_prompt_length"], max_length=DPO_EXPECTED["max_length"],
                    beta=DPO_EXPECTED["beta"])
    settings.update(overrides)
    train(DPOConfig(model=str(base), data=str(FIXTURES / "dpo" / "prefs.jsonl"), output=str(output), **settings),
          log=None)
    return metrics(output)


def test_dpo_reference_is_the_quantized_base_and_training_drives_accuracy_to_one(dpo_base, tmp_path):
    out = tmp_path / "run"
    m = dpo(dpo_base, out, max_steps=12, lr=2e-2, base_quantize="nf4", grad_checkpointing=True)
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference: LoRA B = 0
    assert [r["rewards/accuracies"] for r in m[-3:]] == [1.0] * 3 and m[-1]["loss"] < 0.6
    pairs = load_preferences(FIXTURES / "dpo" / "prefs.jsonl", load_tokenizer(dpo_base),
                             DPO_EXPECTED["max_prompt_length"], DPO_EXPECTED["max_length"]).pairs
    with torch.no_grad():
        held = pair_logps(komt.load_model(dpo_base, quantize="nf4", layout="plain"), pairs, torch.device("cpu"), 2)
        dense = pair_logps(komt.load_model(dpo_base, layout="plain"), pairs, torch.device("cpu"), 2)
    cached = torch.load(out / "ref_logps.pt", weights_only=True)
    torch.testing.assert_close(cached["chosen"].float(), held[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(cached["rejected"].float(), held[1], atol=1e-4, rtol=0)
    assert (cached["chosen"].float() - dense[0]).abs().max() > 1e-3  # not the unquantized base's
    # --ref-model: loaded with the same quantization, so the policy's own checkpoint starts at log 2 too.
    first = dpo(dpo_base, tmp_path / "ref", ref_model=str(dpo_base), base_quantize="int4")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


# --- resume after SIGKILL, DDP, the bench ----------------------------------------------------------------

def command(base: Path, data: Path, output: Path, *extra: str) -> list[str]:
    # dropout on (0.05): the resumed run must also restore the RNG that draws its masks
    return [sys.executable, "-m", "komt.train", "--model", str(base), "--data", str(data), "--output", str(output),
            "--max-steps", "16", "--save-every", "4", "--batch-size", "2", "--grad-accum", "2", "--lr", "5e-3",
            "--warmup-steps", "2", "--seed", "7", "--base-quantize", "nf4", *extra]


@pytest.mark.slow
def test_sigkilled_qlora_run_resumes_to_the_uninterrupted_adapter_and_refuses_another_base(base, data, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(command(base, data, straight), env=environment(), check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    sigkill_after(command(base, data, killed), killed, steps=6)
    assert not (killed / "adapter_model.safetensors").exists() and (killed / "checkpoint-4").is_dir()

    other = subprocess.run(command(base, data, killed, "--resume", "--base-quantize", "int8"), env=environment(),
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 2
    assert other.stderr.splitlines()[-1].startswith("error: --resume: ") and \
        "was trained with base_quantize 'nf4', this run has 'int8'" in other.stderr
    resumed = subprocess.run(command(base, data, killed, "--resume"), env=environment(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    a, b = adapter(straight), adapter(killed)
    assert a.keys() == b.keys() and max(t.abs().max().item() for k, t in a.items() if "lora_B" in k) > 1e-3
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    assert [m["loss"] for m in metrics(killed)] == pytest.approx([m["loss"] for m in metrics(straight)], abs=1e-5)


@pytest.mark.slow
def test_two_processes_train_a_qlora_adapter_like_one(base, data, tmp_path):
    settings = ["--max-steps", "3", "--lr", "1e-2", "--warmup-steps", "1", "--lora-dropout", "0", "--seed", "3",
                "--base-quantize", "int4", "--device", "cpu", "--save-every", "1000"]
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "komt.train",
           "--model", str(base), "--data", str(data), "--output", str(two), "--batch-size", "2", *settings]
    result = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "global batch 4 = 2 x 1 accumulation x 2 process(es)" in result.stderr
    one = tmp_path / "one"
    assert main(["--model", str(base), "--data", str(data), "--output", str(one), "--batch-size", "4", *settings]) == 0
    a, b = adapter(two), adapter(one)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)
    assert [m["loss"] for m in metrics(two)] == pytest.approx([m["loss"] for m in metrics(one)], abs=1e-5)


@pytest.mark.slow
def test_bench_prints_one_row_per_base_quantization_each_from_its_own_process():
    cmd = [sys.executable, "-m", "komt.train.bench", "--preset", "tiny-mistral-32k", "--layers", "1", "--seq-len", "16",
           "--steps", "1", "--warmup", "0", "--device", "cpu", "--base-quantize", "all"]
    result = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("tiny-mistral-32k[1L]")]
    assert [r[2] for r in rows] == ["none", "int8", "int4", "nf4"]
    weights = {r[2]: float(r[-3].removesuffix("MB").replace(",", "")) for r in rows}  # exact: the tensors' bytes
    assert weights["none"] > weights["int8"] > weights["int4"] >= weights["nf4"]
    assert "each setting in its own process" in result.stdout
