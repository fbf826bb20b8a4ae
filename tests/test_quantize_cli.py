"""`python -m komt.quantize`: the written checkpoint loads quantized, as stored, and computes what
quantizing while loading computes; bad input is one line and exit 2, and nothing half-written is left."""

import json
import subprocess
import sys

import pytest
import torch

import komt
from komt.model.quantized_linear import Int4Linear, Int8Linear
from komt.quantize import main, quantize_checkpoint

from conftest import FIXTURES


@pytest.mark.parametrize("fixture", ["tiny-mistral", "tiny-llama"])
@pytest.mark.parametrize("bits", [8, 4])
def test_written_checkpoint_loads_as_stored(tmp_path, fixture, bits):
    source = FIXTURES / fixture
    out = quantize_checkpoint(source, tmp_path / "q", bits)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "komt"
    assert (out / "model.safetensors").exists()
    stored = komt.load_model(out, layout="plain")
    direct = komt.load_model(source, quantize=f"int{bits}", layout="plain")
    kind = Int8Linear if bits == 8 else Int4Linear
    assert isinstance(stored.model.layers[0].self_attn.q_proj, kind)
    assert type(stored.lm_head) is Int8Linear  # the head is int8 in both (a tied one gets its own copy)
    want, got = direct.state_dict(), stored.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    ids = torch.randint(0, stored.config.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.equal(stored(ids), direct(ids))
    fast = komt.load_model(out)  # and with the CPU layouts on top
    with torch.no_grad():
        assert (fast(ids) - direct(ids)).norm() < 2e-2 * direct(ids).norm()


def test_cli_refuses_an_existing_output_and_a_quantized_source(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    assert main([str(FIXTURES / "tiny-mistral"), str(tmp_path / "taken"), "--bits", "8"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "taken" / "x").read_text() == "keep me"
    quantize_checkpoint(FIXTURES / "tiny-mistral", tmp_path / "q8", 8)
    assert main([str(tmp_path / "q8"), str(tmp_path / "again"), "--bits", "4"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
    assert main([str(FIXTURES / "tiny-mistral"), str(tmp_path / "g"), "--bits", "4", "--group-size", "48"]) == 2
    assert "group_size" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8", "taken"]  # no temp folders left


def test_module_runs_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "komt.quantize", str(FIXTURES / "tiny-llama"), str(tmp_path / "q"),
                             "--bits", "4"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr and (tmp_path / "q" / "config.json").exists()
