"""``moesaic train --hf PATH``: fine-tunes a Hugging Face MoE folder, resumes exactly, exports a loadable folder."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from moesaic.train.cli import main  # noqa: E402
from support.hf_models import build  # noqa: E402

TEXT = "".join(f"the cat {w} on the mat number {i % 7}.\n" for i, w in
               enumerate(["sat", "ran", "sat", "lay", "sat", "hid"] * 60))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    path = build("olmoe", root / "olmoe")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], tokenizers.trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    (root / "data.txt").write_text(TEXT)
    return path, root / "data.txt"


def _args(folder, data, out, steps, *extra):
    return ["train", "--hf", str(folder), "--data", str(data), "--out", str(out), "--quiet",
            "--set", f"train.steps={steps}", "--set", "model.block_size=12", "--set", "train.eval_every=3",
            "--set", "train.eval_batches=1", "--set", "engine.train_micro_batch_size_per_gpu=2",
            "--set", "engine.optimizer.params.lr=3e-3", "--set", "train.checkpoint_every=3", *extra]


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_train_hf_fine_tunes_resumes_exactly_and_exports(folder, tmp_path):
    path, data = folder
    assert main(_args(path, data, tmp_path / "whole", 6)) == 0
    history = json.loads((tmp_path / "whole" / "history.json").read_text())
    assert [r[0] for r in history["train"]] == list(range(1, 7)) and len(history["val"]) == 2
    assert all(r[2] > 0 for r in history["train"])  # OLMoE's aux_loss is part of the loss
    assert set(history["load"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    export = tmp_path / "whole" / "hf"
    model, info = transformers.AutoModelForCausalLM.from_pretrained(export, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert (export / "tokenizer.json").exists()
    before, after = _tensors(path), _tensors(export)
    assert sorted(before) == sorted(after) and not all(torch.equal(before[k], after[k]) for k in before)

    # 3 steps, then --resume to 6: the same export, bit for bit
    assert main(_args(path, data, tmp_path / "split", 3)) == 0
    assert main(_args(path, data, tmp_path / "split", 6, "--resume")) == 0
    resumed = _tensors(tmp_path / "split" / "hf")
    assert all(torch.equal(resumed[k], after[k]) for k in after)


def test_train_hf_refuses_model_keys_and_a_folder_without_tokenizer(folder, tmp_path, capsys):
    path, data = folder
    assert main(_args(path, data, tmp_path / "x", 2, "--set", "model.n_layer=3")) == 2
    assert "model.n_layer=3 would be ignored" in capsys.readouterr().err
    bare = build("olmoe", tmp_path / "bare")
    assert main(_args(bare, data, tmp_path / "y", 2)) == 2
    assert "no tokenizer" in capsys.readouterr().err
