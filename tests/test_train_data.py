"""Training data, batching, loss and schedule: label masking checked by hand, bad data named by file and line,
batches that cover the data and split the same way for any number of processes, and the loss/lr math."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from komt.errors import DataError
from komt.generate.prompt import IGNORE_INDEX, prompt_format
from komt.generate.tokenizer import load_tokenizer
from komt.model import Transformer, preset
from komt.train.batching import collate, count_targets, epoch_batches, micro_batches, split_eval
from komt.train.data import Example, load_dataset, read_records
from komt.train.loss import token_loss_sum
from komt.train.schedule import lr_multiplier

from conftest import AN, BOS, END_INST, EOS, INST, NE, NYEONG, SPACE  # hand-checked ids; `tok` fixture there


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# --- records -> (ids, labels) ----------------------------------------------------------------------------

def test_label_masking_hand_checked(tmp_path, tok):
    data = load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"instruction": "안녕", "output": "네"}]), tok, 2048)
    (example,) = data.examples
    prompt = [BOS, *INST, AN, *NYEONG, *END_INST]  # BOS + "[INST]안녕 [/INST]"
    assert example.ids == prompt + [SPACE, NE, EOS]
    assert example.labels == [IGNORE_INDEX] * 12 + [SPACE, NE, EOS]  # the prompt masked, the EOS learned


def test_padding_with_eos_keeps_the_real_eos_label(tok):
    short = Example([BOS, 5, 6, EOS], [IGNORE_INDEX, IGNORE_INDEX, 6, EOS], "a:1")
    long = Example([BOS, 5, 6, 7, 8, EOS], [IGNORE_INDEX, IGNORE_INDEX, 6, 7, 8, EOS], "a:2")
    input_ids, labels = collate([short, long], pad_id=EOS)
    assert input_ids.tolist() == [[BOS, 5, 6, EOS, EOS, EOS], [BOS, 5, 6, 7, 8, EOS]]
    assert labels.tolist() == [[-100, -100, 6, EOS, -100, -100], [-100, -100, 6, 7, 8, EOS]]
    assert count_targets([short, long]) == 2 + 4


def test_input_field_is_appended_alpaca_style(tmp_path, tok):
    records = [{"instruction": "번역하세요", "input": "hello", "output": "안녕"},
               {"instruction": "번역하세요\n\nhello", "output": "안녕"},
               {"instruction": "번역하세요", "input": "", "output": "안녕"},
               {"instruction": "번역하세요", "output": "안녕"}]
    a, b, c, d = load_dataset(write_jsonl(tmp_path / "d.jsonl", records), tok, 2048).examples
    assert a.ids == b.ids and a.labels == b.labels
    assert c.ids == d.ids and c.ids != a.ids


def test_conversation_records_label_every_assistant_turn(tmp_path, tok):
    messages = [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "네"},
                {"role": "user", "content": "안녕"}, {"role": "assistant", "content": "네"}]
    (example,) = load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}]), tok, 2048).examples
    user = [*INST, SPACE, AN, *NYEONG, *END_INST]
    assert example.ids == [BOS, *user, SPACE, NE, EOS, *user, SPACE, NE, EOS]
    masked = [IGNORE_INDEX] * len(user)
    assert example.labels == [IGNORE_INDEX, *masked, SPACE, NE, EOS, *masked, SPACE, NE, EOS]


def test_json_list_and_jsonl_give_the_same_examples(tmp_path, tok):
    records = [{"instruction": "안녕", "output": "네"}, {"messages": [{"role": "user", "content": "a"},
                                                                      {"role": "assistant", "content": "b"}]}]
    (tmp_path / "d.json").write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    from_list = load_dataset(tmp_path / "d.json", tok, 2048).examples
    from_lines = load_dataset(write_jsonl(tmp_path / "d.jsonl", records), tok, 2048).examples
    assert [(e.ids, e.labels) for e in from_list] == [(e.ids, e.labels) for e in from_lines]
    assert [line for line, _ in read_records(tmp_path / "d.json")] == [2, 6]  # where each record starts


def test_truncation_keeps_the_start_and_drops_examples_without_targets(tmp_path, tok):
    records = [{"instruction": "안녕", "output": "네"}, {"instruction": "안녕 " * 40, "output": "네"}]
    data = load_dataset(write_jsonl(tmp_path / "d.jsonl", records), tok, 14)
    assert data.n_records == 2 and data.n_dropped == 1
    (example,) = data.examples
    assert example.ids == [BOS, *INST, AN, *NYEONG, *END_INST, SPACE, NE]  # EOS cut off at 14 tokens
    assert example.labels[-2:] == [SPACE, NE]
    with pytest.raises(DataError, match="max-seq-len"):
        load_dataset(tmp_path / "d.jsonl", tok, 5)


# --- bad data: DataError naming file and line ----------------------------------------------------------

@pytest.mark.parametrize(
    "text, where",
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', ":2: not valid JSON"),
        ('{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n', ":3: record needs"),
        ('{"instruction": "a", "output": "b"}\n["a", "b"]\n', ":2: expected a JSON object"),
        ('{"instruction": "a", "output": 3}\n', ":1: field 'output' must be a string"),
        ('{"instruction": "a", "output": "   "}\n', ":1: .*empty output"),
        ('{"instruction": "a", "input": 5, "output": "b"}\n', ":1: field 'input'"),
        ('{"messages": [{"role": "user", "content": "a"}]}\n', ":1: messages must end with a assistant"),
        ('[\n  {"instruction": "a", "output": "b"},\n  {"output": "b"}\n]\n', ":3: record needs"),
        ('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]', ":3: not valid JSON"),
        ('[\n  {"instruction": "a", "output": "b"}\n', ":3: not valid JSON"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "instruction": "c", "output": "b"}\n',
         ":2: not valid JSON: the key 'instruction' appears twice"),
        ('[\n  {"instruction": "a", "output": "b"},\n  ' + "[" * 100_000 + "]" * 100_000 + "\n]",
         ":3: not valid JSON: nested too deeply"),
        ('{"instruction": "a", "output": NaN}\n', ":1: not valid JSON: NaN is not a JSON number"),
        ("", ": no records"),
        ("[]", ": no records"),
        ("\n  \n", ": no records"),
    ],
    ids=["bad-json-line", "missing-field", "not-an-object", "output-not-str", "empty-output", "input-not-str",
         "chat-ends-with-user", "list-missing-field", "list-bad-json", "list-unclosed", "duplicate-key",
         "list-deeply-nested", "nan", "empty", "empty-list",
         "blank-lines"],
)
def test_bad_data_names_file_and_line(tmp_path, tok, text, where):
    path = tmp_path / "bad.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}{where}"):
        load_dataset(path, tok, 2048)


def test_unreadable_data_files_are_data_errors(tmp_path, tok):
    with pytest.raises(DataError, match="no such data file"):
        load_dataset(tmp_path / "missing.jsonl", tok, 2048)
    with pytest.raises(DataError, match="is a folder"):
        load_dataset(tmp_path, tok, 2048)
    (tmp_path / "latin1.jsonl").write_bytes('{"instruction": "caf\xe9", "output": "b"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_dataset(tmp_path / "latin1.jsonl", tok, 2048)


# --- batching --------------------------------------------------------------------------------------------

def test_epoch_batches_cover_the_data_wrap_to_fill_and_depend_on_seed_and_epoch():
    lengths = [5, 9, 3, 7, 7, 2, 8, 4, 6, 1]
    batches = epoch_batches(lengths, global_batch=4, seed=1, epoch=0)
    assert len(batches) == 3 and all(len(b) == 4 for b in batches)
    flat = [i for b in batches for i in b]
    assert set(flat) == set(range(10)) and len(flat) == 12  # 2 examples seen twice to fill the last batch
    assert all([lengths[i] for i in b] == sorted(lengths[i] for i in b) for b in batches)
    assert batches == epoch_batches(lengths, 4, seed=1, epoch=0)
    assert batches != epoch_batches(lengths, 4, seed=1, epoch=1)
    assert batches != epoch_batches(lengths, 4, seed=2, epoch=0)


def test_similar_lengths_are_batched_together():
    lengths = [i % 50 for i in range(200)]
    batches = epoch_batches(lengths, global_batch=8, seed=0, epoch=0)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 5  # random batches of 8 from 0..49 would spread ~38


def test_micro_batches_partition_the_global_batch_for_any_process_count():
    batch = list(range(8))
    one = micro_batches(batch, batch_size=2, grad_accum=4, rank=0, world_size=1)
    two = [micro_batches(batch, batch_size=2, grad_accum=2, rank=r, world_size=2) for r in range(2)]
    assert one == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert two == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]  # accumulation step a, rank r -> slice a*2 + r


def test_eval_split_is_seeded_and_disjoint():
    train, held = split_eval(20, 0.2, seed=3)
    assert len(held) == 4 and not set(train) & set(held) and sorted(train + held) == list(range(20))
    assert (train, held) == split_eval(20, 0.2, seed=3) and held != split_eval(20, 0.2, seed=4)[1]
    with pytest.raises(ValueError):
        split_eval(1, 0.5, seed=0)


# --- loss and schedule -----------------------------------------------------------------------------------

def test_token_loss_sum_matches_a_per_position_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 3, 10]])
    want = sum(-F.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for b in range(2) for t in range(1, 5)
               if labels[b, t] != -100)
    assert torch.allclose(token_loss_sum(logits, labels), want, atol=1e-5)


def test_a_padded_batch_has_the_loss_of_its_examples_one_by_one():
    torch.manual_seed(0)
    model = Transformer(preset("tiny-mistral-32k", vocab_size=64)).eval()
    a = Example([1, 5, 6, 7, 2], [-100, -100, 6, 7, 2], "a")
    b = Example([1, 9, 10, 11, 12, 13, 14, 2], [-100, -100, -100, 11, 12, 13, 14, 2], "b")
    with torch.no_grad():
        batched = token_loss_sum(model(collate([a, b], 2)[0]), collate([a, b], 2)[1])
        alone = sum(token_loss_sum(model(collate([e], 2)[0]), collate([e], 2)[1]) for e in (a, b))
    assert torch.allclose(batched, alone, atol=1e-4)


def test_warmup_then_cosine_to_zero():
    assert [lr_multiplier(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, 4, 20) == 1.0
    assert math.isclose(lr_multiplier(12, 4, 20), 0.5)  # half way through the decay
    assert lr_multiplier(19, 4, 20) < 0.01 and lr_multiplier(20, 4, 20) == 0.0
    values = [lr_multiplier(s, 4, 20) for s in range(4, 21)]
    assert values == sorted(values, reverse=True)
    assert lr_multiplier(0, 0, 10) == 1.0  # no warm-up


# --- records in a chat template's format (SmolLM2's ChatML) -------------------------------------------------

def test_template_format_trains_on_assistant_turns_and_their_end_of_turn(tmp_path):
    smol = load_tokenizer(Path(__file__).parent / "fixtures" / "smollm2-tokenizer")
    fmt = prompt_format(smol)  # auto: SmolLM2 ships a chat template
    assert fmt.name == "template"
    records = [{"instruction": "What is the capital of France?", "output": "Paris."},
               {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "bye"}, {"role": "assistant", "content": "Bye."}]}]
    single, chat = load_dataset(write_jsonl(tmp_path / "d.jsonl", records), fmt, 2048).examples
    im_end = smol.eos_id
    assert [t for t in single.labels if t != IGNORE_INDEX] == [*smol.encode("Paris.", bos=False), im_end]
    assert single.ids[: len(fmt.prompt("What is the capital of France?"))] == fmt.prompt("What is the capital of France?")
    learned = [t for t in chat.labels if t != IGNORE_INDEX]
    assert learned == [*smol.encode("Hello!", bos=False), im_end, *smol.encode("Bye.", bos=False), im_end]
    assert smol.decode(learned) == "Hello!Bye."  # <|im_end|> is special: decoded to nothing
