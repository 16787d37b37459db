"""Format 3 (stage-3 checkpoints): a tensor stored in row pieces loads whole, and pieces that do not tile are refused.

A stage-3 save needs a process group (tests/distributed/test_zero3_checkpoint.py); here a format-2
checkpoint of the one-process engine is cut into row pieces by hand, as each rank of a sharded save
writes its rows, and sealed as format 3, so the reader's assembly and its checks run in one process.
"""

import json
import shutil

import pytest
import torch

from moesaic import checkpoint
from moesaic.checkpoint import CheckpointError
from moesaic.checkpoint.files import read_tensors, write_tensors
from moesaic.checkpoint.manifest import seal
from support.checkpoint_net import make_engine, train


def _as_pieces(folder, cuts, mutate=None):
    """Rewrite ``folder`` as format 3: every dense tensor of 2+ rows in pieces at ``cuts`` (fractions of the rows)."""
    manifest = checkpoint.read_manifest(folder)
    manifest.pop("manifest_crc32", None)
    dense = read_tensors(folder, manifest["dense"]["file"], manifest["files"][manifest["dense"]["file"]])
    parts = []
    for i in range(len(cuts) + 1):
        tensors, rows = {}, {}
        for name, t in dense.items():
            n = t.shape[0] if t.dim() else 0
            if n < 2:  # small tensors stay whole, in the first file
                if i == 0:
                    tensors[name] = t.clone()
                continue
            bounds = [0] + [int(c * n) for c in cuts] + [n]
            a, b = bounds[i], bounds[i + 1]
            if b > a:
                tensors[name], rows[name] = t[a:b].clone(), [a, b, n]
        rel = f"dense-{i}.safetensors"
        entry = write_tensors(folder / rel, tensors)
        if rows:
            entry["rows"] = rows
        manifest["files"][rel] = entry
        parts.append(rel)
    del manifest["files"][manifest["dense"]["file"]]
    (folder / manifest["dense"]["file"]).unlink()
    manifest["dense"] = {"files": parts, "aliases": manifest["dense"]["aliases"]}
    manifest["experts"] = {layer: {n: [rel] for n, rel in numbers.items()} for layer, numbers in
                           manifest["experts"].items()}
    manifest["optimizer"]["state"] = {k: [v] for k, v in manifest["optimizer"]["state"].items()}
    manifest["format_version"] = 3
    if mutate is not None:
        mutate(manifest)
    (folder / "manifest.json").write_bytes(seal(manifest))
    return manifest


def test_row_pieces_load_whole_into_an_unsharded_model(tmp_path):
    engine = make_engine()
    train(engine, 2)
    folder = engine.save_checkpoint(tmp_path / "ck", tag="t")
    expected = {k: v.clone() for k, v in engine.module.state_dict().items()}
    _as_pieces(folder, [0.25, 0.5])
    assert checkpoint.verify(tmp_path / "ck", tag="t") == folder
    fresh = make_engine()
    fresh.load_checkpoint(tmp_path / "ck", tag="t")
    for k, v in fresh.module.state_dict().items():
        assert torch.equal(v, expected[k]), k


@pytest.mark.parametrize("how,match", [
    ("overlap", r"rows 1:\d+ of \d+ of '.*' .*do not continue the pieces before them"),
    ("gap", r"the pieces of '.*' cover rows 0:\d+ of \d+"),
    ("whole_and_piece", r"is stored in more than one file of its unit|do not continue the pieces before them"),
    ("bad_rows", r"rows of '.*' must be \[start, stop, total\] .*matching the piece's first dimension"),
    ("not_a_list", r"dense tensors must list its files \(format 3\)"),
])
def test_pieces_that_do_not_tile_are_refused_and_nothing_changes(tmp_path, how, match):
    engine = make_engine()
    train(engine, 1)
    folder = engine.save_checkpoint(tmp_path / "ck", tag="t")

    def mutate(m):
        first = m["files"]["dense-1.safetensors"]
        key = sorted(first["rows"])[0]
        if how == "overlap":  # the second piece claims to start one row into the first
            a, b, n = first["rows"][key]
            first["rows"][key] = [1, 1 + b - a, n]
        elif how == "gap":  # the last piece of a tensor is dropped from the unit
            m["dense"]["files"] = m["dense"]["files"][:-1]
        elif how == "whole_and_piece":
            m["dense"]["files"] = m["dense"]["files"] + ["dense-0.safetensors"]
        elif how == "bad_rows":
            first["rows"][key] = [0, 10 ** 6, 10 ** 6]
        elif how == "not_a_list":
            m["dense"]["files"] = "dense-0.safetensors"

    if how == "whole_and_piece":  # a unit naming one file twice is refused as such; name a copy instead
        def mutate(m, _inner=mutate):  # noqa: F811
            shutil.copy(folder / "dense-0.safetensors", folder / "dense-0b.safetensors")
            m["files"]["dense-0b.safetensors"] = dict(m["files"]["dense-0.safetensors"])
            m["dense"]["files"] = m["dense"]["files"] + ["dense-0b.safetensors"]
    _as_pieces(folder, [0.5], mutate)
    other = make_engine()
    before = {k: v.clone() for k, v in other.module.state_dict().items()}
    with pytest.raises(CheckpointError, match=match):
        other.load_checkpoint(tmp_path / "ck", tag="t")
    assert all(torch.equal(v, before[k]) for k, v in other.module.state_dict().items())
    assert json.loads((folder / "manifest.json").read_text())["format_version"] == 3
