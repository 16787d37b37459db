"""examples/tiny_hf_model.py (README, "Hugging Face models"): a tiny model of each family it offers, with a
tokenizer, built offline; moesaic.hf loads it and the tokenizer covers any text (moesaic train --hf needs both)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import moesaic.hf  # noqa: E402
from moesaic.train.hf import load_tokenizer  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "tiny_hf_model.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("tiny_hf_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_the_example_writes_a_folder_moesaic_loads_and_trains_on(example, family, tmp_path, monkeypatch, capsys):
    folder = tmp_path / family
    monkeypatch.setattr(sys, "argv", ["tiny_hf_model.py", str(folder), "--family", family])
    example.main()
    assert f"{folder}: a 2-layer {family} model" in capsys.readouterr().out
    model = moesaic.hf.load(folder)
    assert list(moesaic.hf.converted_layers(model)) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    tokenizer = load_tokenizer(folder)  # what moesaic train --hf reads
    ids = tokenizer("déf f(x):\n    return x  # ünïcode", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "déf f(x):\n    return x  # ünïcode"  # byte-level: nothing is unknown
    assert len(tokenizer) == model.config.vocab_size == example.VOCAB
    loss = moesaic.hf.causal_lm_loss(model, {"input_ids": torch.tensor([ids])})
    assert abs(loss.item() - math.log(example.VOCAB)) < 1.0  # random weights: about log(vocabulary)


def test_an_unknown_family_is_refused(example):
    with pytest.raises(SystemExit, match="--family must be one of"):
        example.config("llama")
