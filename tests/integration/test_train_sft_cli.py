"""``moesaic train --hf PATH --data chat.jsonl``: answers-only fine-tuning of packed rows, exact resume, chat export."""

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

from moesaic.train.cli import main  # noqa: E402
from support.hf_models import randomise, tiny_config, tiny_tokenizer  # noqa: E402
from support.train_runs import exported_tensors as _tensors, hf_train_args  # noqa: E402

CHAT = Path(__file__).parents[2] / "data" / "stdlib_chat.jsonl"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    rows = [json.loads(line) for line in CHAT.read_text().splitlines()]
    rows = [r for r in rows if sum(len(m["content"]) for m in r["messages"]) < 700][:60]  # short: a fast test
    texts = [m["content"] for r in rows for m in r["messages"]]
    tok = tiny_tokenizer(texts, 400)
    cfg = tiny_config("olmoe")
    cfg.vocab_size, cfg.max_position_embeddings = len(tok), 512
    cfg.eos_token_id = cfg.pad_token_id = tok.eos_token_id
    cfg.bos_token_id = None
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    randomise(model)
    model.save_pretrained(root / "olmoe")
    tok.save_pretrained(root / "olmoe")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "olmoe", data


SETTINGS = {"model.block_size": 384, "train.eval_every": 2, "train.eval_batches": 1,
            "engine.train_micro_batch_size_per_gpu": 2, "engine.optimizer.params.lr": 3e-3, "train.checkpoint_every": 2,
            "data.val_percent": 10, "data.truncate": "true"}


def _args(folder, data, out, steps, *extra):
    return hf_train_args(folder, data, out, steps, SETTINGS, *extra)


def test_sft_trains_on_answers_resumes_exactly_and_exports_a_chat_model(folder, tmp_path):
    path, data = folder
    assert main(_args(path, data, tmp_path / "whole", 4)) == 0
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["complete"] and 0.5 < summary["padding_efficiency"] <= 1.0 and summary["answer_tokens_per_s"] > 0
    assert summary["data"]["train"]["documents"] + summary["data"]["val"]["documents"] == 60
    assert summary["recompute"] == "block"  # train.recompute = "auto": fine-tuning recomputes each block
    history = json.loads((tmp_path / "whole" / "history.json").read_text())
    assert len(history["train"]) == 4 and len(history["val"]) == 2
    # 2 steps, then --resume to 4: the same export, bit for bit (the same rows mid-epoch)
    assert main(_args(path, data, tmp_path / "split", 2)) == 0
    assert main(_args(path, data, tmp_path / "split", 4, "--resume")) == 0
    whole, resumed = _tensors(tmp_path / "whole" / "hf"), _tensors(tmp_path / "split" / "hf")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    # the export carries the tokenizer and its chat template: from_pretrained + apply_chat_template + generate
    export = tmp_path / "whole" / "hf"
    tok = transformers.AutoTokenizer.from_pretrained(export)
    model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "Write `wrap(text)`"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5 or out[0, -1] == tok.eos_token_id


def test_sft_refuses_changed_data_on_resume_and_runs_padded(folder, tmp_path, capsys):
    path, data = folder
    mine = tmp_path / "mine.jsonl"
    mine.write_text(data.read_text())
    assert main(_args(path, mine, tmp_path / "run", 1, "--set", "data.packing=false",
                      "--set", "train.recompute=none")) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["padding_efficiency"] < 1.0  # padded rows: the pads are counted, and kept from the experts
    assert summary["recompute"] == "none"  # an explicit train.recompute wins over the fine-tuning default
    mine.write_text(data.read_text() + data.read_text().splitlines()[0] + "\n")
    capsys.readouterr()
    assert main(_args(path, mine, tmp_path / "run", 2, "--set", "data.packing=false", "--resume")) == 2
    assert f"the data changed since the run started: {mine}" in capsys.readouterr().err


def test_sft_refuses_a_block_size_past_the_model_and_data_without_schema(folder, tmp_path, capsys):
    path, data = folder
    assert main(_args(path, data, tmp_path / "a", 1, "--set", "model.block_size=1024")) == 2
    assert "model.block_size=1024 is larger than the model's max_position_embeddings=512" in capsys.readouterr().err
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "q", "answer": "a"}\n')
    assert main(_args(path, odd, tmp_path / "b", 1)) == 2
    assert "the rows have the fields ['answer', 'question']" in capsys.readouterr().err
