"""Hugging Face folders that lie, or ask to run code: refused (or loaded without their code), never cast silently.

Each folder is a tiny model built offline (``support.hf_models``), saved with ``save_pretrained``
and then tampered with: an int32 expert tensor, a safetensors header whose dtype or shape does not
match its bytes, an unknown ``model_type``, and a ``config.json`` / ``tokenizer_config.json`` with an
``auto_map`` naming Python files of the folder. Those files would write a marker file if anything
imported them; stdin answers "y" to any prompt, so a prompt that appeared would also run them.
"""

import io
import json
import shutil
import struct
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import moesaic.hf  # noqa: E402
from moesaic.hf.files import FolderSource  # noqa: E402
from moesaic.train.hf import load_tokenizer  # noqa: E402

from support.hf_models import build  # noqa: E402

SIX = r"\['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v3', 'gpt_oss'\]"
EXPERT = "model.layers.0.block_sparse_moe.experts.1.w1.weight"  # (F, D) = (24, 16) fp32 in the tiny Mixtral


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return build("mixtral", tmp_path_factory.mktemp("hf") / "mixtral")


@pytest.fixture
def folder(mixtral, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(mixtral, out)
    return out


def _edit_tensors(folder, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _edit_header(folder, edit):
    """Rewrite the JSON header of model.safetensors in place (same length: padded with spaces)."""
    path = folder / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(data[:8] + text + b" " * (n - len(text)) + data[8 + n:])


def _edit_config(folder, name="config.json", **changes):
    path = folder / name
    cfg = json.loads(path.read_text()) if path.exists() else {}
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _plant_code(folder, marker):
    """Python files an ``auto_map`` can name; importing any of them creates ``marker``."""
    body = f"open({str(marker)!r}, 'w').write('ran')\n"
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (folder / name).write_text(body)


AUTO_MAP = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}


@pytest.fixture
def answer_yes(monkeypatch):
    """stdin that would accept transformers' "Do you wish to run the custom code? [y/N]" prompt."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))


# --- dtypes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_integer_expert_tensor_is_refused_naming_file_and_key(folder, dtype):
    _edit_tensors(folder, lambda t: t.update({EXPERT: (t[EXPERT] * 100).to(dtype)}))
    with pytest.raises(ValueError, match=rf"tensor '{EXPERT}' in .*m/model\.safetensors has dtype {dtype}.*"
                                         r"needs a floating-point tensor"):
        moesaic.hf.load(folder)


def test_integer_dense_tensor_is_refused_too(folder):
    _edit_tensors(folder, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int32)}))
    with pytest.raises(ValueError, match=r"tensor 'model\.norm\.weight' in .*model\.safetensors has dtype torch\.int32"):
        moesaic.hf.load(folder)


def test_other_float_widths_still_load_as_the_model_dtype(folder):
    # fp64 and bf16 tensors in an fp32 model are legitimate: copied (cast) as transformers does
    _edit_tensors(folder, lambda t: t.update({EXPERT: t[EXPERT].double()}))
    model = moesaic.hf.load(folder)
    got = model.model.layers[0].mlp.experts.expert_state_dict(1)["gate_proj.weight"]
    assert got.dtype == torch.float32


def test_integer_tensor_in_a_dense_folder_is_refused_by_upcycle(tmp_path):
    from support.hf_models import COMMON

    cfg = transformers.LlamaConfig(**COMMON, intermediate_size=24)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    key = "model.layers.0.mlp.up_proj.weight"
    _edit_tensors(tmp_path, lambda t: t.update({key: t[key].to(torch.int32)}))
    with pytest.raises(ValueError, match=rf"tensor '{key}' in .*model\.safetensors has dtype torch\.int32"):
        moesaic.hf.upcycle(tmp_path, 4, 2)


# --- headers that lie -------------------------------------------------------------------------------

def test_header_lying_about_dtype_names_file_and_tensor(folder):
    # F32 -> F64: the entry now claims twice the bytes its data_offsets span
    _edit_header(folder, lambda h: h[EXPERT].update(dtype="F64"))
    with pytest.raises(ValueError, match=rf"model\.safetensors: corrupt safetensors header: tensor '{EXPERT}' is "
                                         r"declared F64 of shape \(24, 16\) \(3072 bytes\) but its data_offsets "
                                         r"\[\d+, \d+\] span 1536 bytes"):
        moesaic.hf.load(folder)


def test_header_lying_about_shape_names_file_and_tensor(folder):
    _edit_header(folder, lambda h: h[EXPERT].update(shape=[24, 8]))
    with pytest.raises(ValueError, match=rf"model\.safetensors: corrupt safetensors header: tensor '{EXPERT}'.*"
                                         r"\(24, 8\)"):
        moesaic.hf.load(folder)


def test_header_lying_about_dtype_with_the_same_width_is_refused_as_not_floating(folder):
    # F32 -> I32 keeps the byte count: the header is consistent, the dtype is still no weight's
    _edit_header(folder, lambda h: h[EXPERT].update(dtype="I32"))
    with pytest.raises(ValueError, match=rf"tensor '{EXPERT}' in .*model\.safetensors has dtype torch\.int32"):
        moesaic.hf.load(folder)


def test_header_offsets_that_overlap_or_leave_bytes_are_named(folder, mixtral):
    def overlap(h):
        a, b = h[EXPERT]["data_offsets"]
        h[EXPERT]["data_offsets"] = [a - 4, b - 4]

    _edit_header(folder, overlap)
    with pytest.raises(ValueError, match=rf"model\.safetensors: corrupt safetensors header: tensor '{EXPERT}' at "
                                         r"bytes \[\d+, \d+\) overlaps tensor"):
        moesaic.hf.load(folder)
    shutil.rmtree(folder)
    shutil.copytree(mixtral, folder)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes() + b"\0" * 16)  # safetensors refuses trailing bytes ("not fully covered")
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt safetensors file: 16 bytes after the last"):
        moesaic.hf.load(folder)


def test_reading_a_file_that_changed_after_its_header_was_checked_names_file_and_tensor(folder):
    source = FolderSource(folder)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-64])  # truncated behind the reader's back
    with pytest.raises(ValueError, match=rf"model\.safetensors: cannot read tensor '{EXPERT}'"):
        source.get(EXPERT)


# --- model_type ---------------------------------------------------------------------------------------

def test_unknown_model_type_lists_the_six_families(folder):
    _edit_config(folder, model_type="evil_moe")
    with pytest.raises(ValueError, match=rf"config\.json: unsupported architecture: config\.model_type='evil_moe'; "
                                         rf"moesaic\.hf supports {SIX}$"):
        moesaic.hf.load(folder)


# --- auto_map: a folder's own code is never run, nor offered to run ---------------------------------------

def test_auto_map_with_an_unknown_model_type_is_refused_without_a_prompt(folder, tmp_path, answer_yes, capsys):
    marker = tmp_path / "code-ran"
    _plant_code(folder, marker)
    _edit_config(folder, model_type="evil_moe", auto_map=AUTO_MAP)
    with pytest.raises(ValueError, match=rf"model_type='evil_moe'; moesaic\.hf supports {SIX}; its auto_map asks to "
                                         r"run the folder's own code \(AutoConfig: configuration_evil\.EvilConfig, "
                                         r".*\), which moesaic never does \(trust_remote_code=False\)"):
        moesaic.hf.load(folder)
    out = capsys.readouterr()
    assert "[y/N]" not in out.out + out.err
    assert not marker.exists()


def test_auto_map_with_a_supported_model_type_loads_transformers_own_classes_and_says_so(folder, tmp_path, answer_yes,
                                                                                         capsys):
    marker = tmp_path / "code-ran"
    _plant_code(folder, marker)
    _edit_config(folder, auto_map=AUTO_MAP)
    with pytest.warns(UserWarning, match=r"config\.json: auto_map asks to run the folder's own code "
                                         r"\(AutoConfig: configuration_evil\.EvilConfig.*\); moesaic never runs a "
                                         r"model folder's code \(trust_remote_code=False\)"):
        model = moesaic.hf.load(folder)
    assert type(model).__name__ == "MixtralForCausalLM" and type(model).__module__.startswith("transformers.")
    out = capsys.readouterr()
    assert "[y/N]" not in out.out + out.err
    assert not marker.exists()


def _save_tokenizer(folder):
    text = "the quick brown fox jumps over the lazy dog " * 4
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], tokenizers.trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)


TOKENIZER_MAP = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}


def test_tokenizer_of_an_unknown_model_type_with_auto_map_is_refused_without_a_prompt(folder, tmp_path, answer_yes,
                                                                                       capsys):
    marker = tmp_path / "code-ran"
    _plant_code(folder, marker)
    _save_tokenizer(folder)
    _edit_config(folder, model_type="evil_moe", auto_map={**AUTO_MAP, "AutoTokenizer": TOKENIZER_MAP["AutoTokenizer"]})
    _edit_config(folder, "tokenizer_config.json", auto_map=TOKENIZER_MAP, tokenizer_class="EvilTokenizer")
    with pytest.raises(ValueError, match=rf"model_type='evil_moe'; moesaic\.hf supports {SIX}; its auto_map"):
        load_tokenizer(folder)
    out = capsys.readouterr()
    assert "[y/N]" not in out.out + out.err
    assert not marker.exists()


def test_tokenizer_auto_map_of_a_supported_model_uses_the_built_in_class_and_says_so(folder, tmp_path, answer_yes):
    marker = tmp_path / "code-ran"
    _plant_code(folder, marker)
    _save_tokenizer(folder)
    _edit_config(folder, "tokenizer_config.json", auto_map=TOKENIZER_MAP)
    with pytest.warns(UserWarning, match=r"tokenizer_config\.json: auto_map asks to run the folder's own tokenizer "
                                         r"code \(AutoTokenizer: \['tokenization_evil\.EvilTokenizer', None\]\)"):
        tok = load_tokenizer(folder)
    assert type(tok).__module__.startswith("transformers.") and tok("the fox")["input_ids"]
    assert not marker.exists()
