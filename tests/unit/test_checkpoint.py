"""Per-expert checkpoints on one process: layout, verification, paths, crash safety, format 1, no pickle.

Tests that start other processes (SIGKILL, kill loop) are in tests/integration/test_checkpoint_kills.py.
"""

import json
import os
import random
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import moesaic
from moesaic import checkpoint, deepspeed
from moesaic.checkpoint import CheckpointError
from moesaic.checkpoint.directory import tidy
from moesaic.checkpoint.legacy import upgrade_dense_names
from moesaic.layer.identity import ExpertIndex
from moesaic.checkpoint.manifest import seal
from moesaic.checkpoint.names import encode_component
from support.checkpoint_net import CONFIG, Net, make_engine, train, transient_files as _transient

DATA = Path(__file__).resolve().parents[1] / "data"


def _snapshot(engine):
    model = {k: v.clone() for k, v in engine.module.state_dict().items()}
    optim = {n: {k: v.clone() for k, v in e.items()} for n, e in engine.optimizer.state_dict()["state"].items()}
    return model, optim


def _unchanged(engine, snap):
    model, optim = snap
    now = engine.optimizer.state_dict()["state"]
    return (all(torch.equal(v, model[k]) for k, v in engine.module.state_dict().items())
            and all(torch.equal(v, optim[n][k]) for n, e in now.items() for k, v in e.items()))


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# --- layout -------------------------------------------------------------------------------------

def test_layout_names_experts_by_layer_and_number(tmp_path):
    engine = make_engine()
    train(engine, 2)
    folder = engine.save_checkpoint(tmp_path)
    assert folder.name == "global_step2" and (tmp_path / "latest").read_text() == "global_step2"
    manifest = checkpoint.read_manifest(folder)
    assert manifest["format_version"] == 2 == checkpoint.FORMAT_VERSION
    assert manifest["step"] == 2 and manifest["world_size"] == 1 and manifest["tag"] == "global_step2"
    assert manifest["moe_layers"] == {"ffn": {"num_experts": 4, "ep_size": 1}}
    assert manifest["experts"] == {"ffn": {str(i): f"experts/ffn/{i}.safetensors" for i in range(4)}}
    # no pickle anywhere: tensors in safetensors, everything else JSON
    assert all(f.endswith((".safetensors", ".json")) for f in _files(folder)), _files(folder)
    assert set(manifest["files"]) == set(_files(folder)) - {"manifest.json"}
    # the manifest maps every optimizer entry to its file; expert state sits with its expert
    state = manifest["optimizer"]["state"]
    assert set(state) == set(engine.optimizer.state_names())
    assert state["inp.weight"].startswith("optim/dense-") and state["ffn.deepspeed_moe.gate.wg.weight"] == state["inp.weight"]
    assert state["ffn/2/0.weight"].startswith("experts/ffn/2.optim-")
    # the files are plain safetensors
    assert set(load_file(folder / "experts/ffn/2.safetensors")) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    optim = load_file(folder / state["ffn/2/0.weight"])
    assert {"ffn/2/0.weight::exp_avg", "ffn/2/0.weight::exp_avg_sq", "ffn/2/0.weight::step"} <= set(optim)
    assert int(optim["ffn/2/0.weight::step"]) == 2
    assert torch.equal(load_file(folder / "dense.safetensors")["inp.weight"], engine.module.inp.weight)
    # every tensor file records its tensors' dtype and shape
    assert manifest["files"]["dense.safetensors"]["tensors"]["inp.weight"] == {"dtype": "F32", "shape": [8, 8]}


def test_bare_model_round_trip(tmp_path):
    a, b = Net(), Net()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    checkpoint.save(tmp_path, a, tag="t", index=ExpertIndex.build(a))
    checkpoint.load(tmp_path, b, index=ExpertIndex.build(b))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


# --- client state and RNG without pickle --------------------------------------------------------

def test_client_state_round_trips_exactly_with_tensors_and_tuples(tmp_path):
    engine = make_engine()
    train(engine, 1)
    client = {"data": {"epoch": 3, "cursor": 2 ** 70, "frac": 0.1, "nan": float("nan"), "ok": True, "none": None},
              "pair": (1, (2, "x")), "history": [[1, 2.5], [2, 2.25]], "ids": torch.arange(5),
              "nested": {"w": torch.ones(2, 2, dtype=torch.bfloat16)}, "": "empty key"}
    torch.manual_seed(5)
    random.seed(6)
    engine.save_checkpoint(tmp_path, client_state=client)
    want_torch, want_py = torch.rand(3), random.random()
    fresh = make_engine()
    _, got = fresh.load_checkpoint(tmp_path)
    assert torch.equal(torch.rand(3), want_torch) and random.random() == want_py, "RNG states restored"
    assert got["pair"] == (1, (2, "x")) and isinstance(got["pair"][1], tuple)
    assert got["history"] == [[1, 2.5], [2, 2.25]] and got["data"]["cursor"] == 2 ** 70 and got[""] == "empty key"
    assert got["data"]["nan"] != got["data"]["nan"] and got["data"]["ok"] is True and got["data"]["none"] is None
    assert torch.equal(got["ids"], torch.arange(5)) and got["nested"]["w"].dtype == torch.bfloat16


@pytest.mark.parametrize("value, where, kind", [
    ({"a": {"b": [1, {2, 3}]}}, r"client_state\['a'\]\['b'\]\[1\]", "builtins.set"),
    ({"pos": __import__("numpy").float64(1.5)}, r"client_state\['pos'\]", "numpy.float64"),
    ({"by_id": {5: "x"}}, r"client_state\['by_id'\] has the key 5 of type int", ""),
    ({"obj": object()}, r"client_state\['obj'\]", "builtins.object"),
])
def test_client_state_that_json_cannot_hold_fails_at_save_naming_the_key(tmp_path, value, where, kind):
    engine = make_engine()
    with pytest.raises(TypeError, match=where) as info:
        engine.save_checkpoint(tmp_path, client_state=value)
    assert kind in str(info.value)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == [], "nothing written"


class _RunsCode:
    """Unpickling this runs ``open(marker, 'w')``: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _reseal_v1(folder, rel):
    """Make a format-1 manifest match an edited file (what an attacker who edits files can do)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / rel).read_bytes()
    manifest["files"][rel] = {"crc32": zlib.crc32(data), "bytes": len(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_crafted_pickle_in_a_format1_checkpoint_is_refused_without_running(tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(DATA / "v1_checkpoint", ck)
    marker = tmp_path / "pwned"
    torch.save({"rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": None},
                "client_state": {"x": _RunsCode(marker)}}, ck / "step2" / "rank0.state.pt")
    _reseal_v1(ck / "step2", "rank0.state.pt")
    target = _v1_engine()
    snap = _snapshot(target)
    with pytest.raises(CheckpointError, match=r"rank0.state.pt: .*no longer unpickles"):
        target.load_checkpoint(ck)
    assert not marker.exists(), "unpickling ran code"
    assert _unchanged(target, snap)
    with pytest.raises(CheckpointError, match=r"rank0.state.pt"):
        checkpoint.verify(ck)
    assert not marker.exists()


def test_a_crafted_pickle_in_a_deepspeed_checkpoint_needs_explicit_trust(tmp_path):
    ds = tmp_path / "ds" / "global_step1"
    ds.mkdir(parents=True)
    (tmp_path / "ds" / "latest").write_text("global_step1")
    marker = tmp_path / "pwned"
    torch.save({"module": {}, "evil": _RunsCode(marker)}, ds / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: .*trust_pickle=True"):
        deepspeed.convert_deepspeed_checkpoint(tmp_path / "ds", Net(), tmp_path / "out")
    assert not marker.exists(), "unpickling ran code"
    with pytest.raises(TypeError, match="trust_pickle must be a bool"):
        deepspeed.convert_deepspeed_checkpoint(tmp_path / "ds", Net(), tmp_path / "out", trust_pickle="yes")


# --- verification -------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    engine = make_engine()
    train(engine, 1)
    folder = engine.save_checkpoint(tmp_path / "ck", client_state={"pos": 7})
    return tmp_path / "ck", folder


def _expect_refused(root, rel, match):
    target = make_engine()
    snap = _snapshot(target)
    with pytest.raises(CheckpointError, match=match):
        target.load_checkpoint(root)
    assert _unchanged(target, snap), f"{rel}: nothing may be copied before everything is verified"
    with pytest.raises(CheckpointError, match=match):
        checkpoint.verify(root)


def test_every_file_with_a_flipped_byte_is_refused_by_name(saved):
    root, folder = saved
    for rel in _files(folder):
        f = folder / rel
        original = f.read_bytes()
        for pos in sorted({0, 9, len(original) // 2, len(original) - 1}):
            data = bytearray(original)
            data[pos] ^= 0x01
            f.write_bytes(bytes(data))
            try:
                _expect_refused(root, rel, rf"{rel}: ")
            finally:
                f.write_bytes(original)
    checkpoint.verify(root)  # all restored


def test_every_truncated_file_is_refused_by_name(saved):
    root, folder = saved
    for rel in _files(folder):
        f = folder / rel
        original = f.read_bytes()
        for size in (0, len(original) // 2, len(original) - 1):
            f.write_bytes(original[:size])
            try:
                _expect_refused(root, rel, rf"{rel}: ")
            finally:
                f.write_bytes(original)


def _edit_dtype(f, name, new):
    """Rewrite one tensor's dtype in a safetensors header, same length, same bytes."""
    data = f.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + n])
    old = header[name]["dtype"]
    header[name]["dtype"] = new
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(old) == len(new)
    text += b" " * (n - len(text))
    f.write_bytes(data[:8] + text + data[8 + n:])


def test_a_header_edited_from_f32_to_i32_is_refused(saved):
    root, folder = saved
    _edit_dtype(folder / "experts/ffn/1.safetensors", "0.weight", "I32")
    _expect_refused(root, "experts/ffn/1.safetensors", r"experts/ffn/1.safetensors: checksum mismatch")
    # even with a manifest rewritten to match, the dtype differs from the model's and is refused
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("manifest_crc32")
    data = (folder / "experts/ffn/1.safetensors").read_bytes()
    manifest["files"]["experts/ffn/1.safetensors"].update(crc32=zlib.crc32(data))
    manifest["files"]["experts/ffn/1.safetensors"]["tensors"]["0.weight"]["dtype"] = "I32"
    (folder / "manifest.json").write_bytes(seal(manifest))
    target = make_engine()
    with pytest.raises(CheckpointError, match=r"'0.weight' is torch.int32 in the checkpoint but torch.float32"):
        target.load_checkpoint(root)


def test_json_edits_and_bad_json_are_refused_by_name(saved):
    root, folder = saved
    original = (folder / "engine.json").read_text()
    edited = original.replace('"global_steps": 1', '"global_steps": 7')  # same size: only the CRC can tell
    assert edited != original and len(edited) == len(original)
    (folder / "engine.json").write_text(edited)
    _expect_refused(root, "engine.json", r"engine.json: checksum mismatch")
    (folder / "engine.json").write_text(original)
    (folder / "optimizer.json").write_text("{\"optimizer\": \"AdamW\", \"param_gr")
    _expect_refused(root, "optimizer.json", r"optimizer.json: \d+ bytes but the manifest recorded")


def test_the_manifest_checks_itself(saved):
    root, folder = saved
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text.replace('"world_size": 1', '"world_size": 2'))
    _expect_refused(root, "manifest.json", r"manifest.json: checksum mismatch")
    (folder / "manifest.json").write_text(text[:len(text) // 2])
    _expect_refused(root, "manifest.json", r"manifest.json: not valid JSON")
    (folder / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"no manifest.json"):
        make_engine().load_checkpoint(root)


def test_missing_files_fail_clearly_and_load_nothing(saved):
    root, folder = saved
    (folder / "experts/ffn/3.safetensors").unlink()
    _expect_refused(root, "experts/ffn/3.safetensors", r"experts/ffn/3.safetensors: file missing")


def test_newer_format_and_mismatched_models_are_refused(tmp_path):
    engine = make_engine()
    folder = engine.save_checkpoint(tmp_path, tag="t")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("manifest_crc32")
    (folder / "manifest.json").write_bytes(seal({**manifest, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99 is newer"):
        checkpoint.load(tmp_path, m := Net(), tag="t", index=ExpertIndex.build(m))
    (folder / "manifest.json").write_bytes(seal(manifest))
    wide = Net(d=12)
    snap = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"dense.safetensors: '.*' has shape \(\d+, 8\) in the checkpoint but"):
        checkpoint.load(tmp_path, wide, tag="t", index=ExpertIndex.build(wide))
    assert all(torch.equal(v, snap[k]) for k, v in wide.state_dict().items())
    with pytest.raises(CheckpointError, match="layer 'ffn' has 4 experts in the checkpoint but 8 in the model"):
        checkpoint.load(tmp_path, m := Net(experts=8), tag="t", index=ExpertIndex.build(m))
    with pytest.raises(CheckpointError, match="no 'latest' file"):
        checkpoint.load(tmp_path / "nowhere", m := Net(), index=ExpertIndex.build(m))


def test_adamw_checkpoint_does_not_load_into_an_sgd_engine(tmp_path):
    engine = make_engine()
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    cfg = dict(CONFIG, optimizer={"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}})
    sgd, *_ = moesaic.initialize(model=Net(), config=cfg)
    before = [p.detach().clone() for p in sgd.module.parameters()]
    with pytest.raises(CheckpointError, match=r"state is for 'AdamW' but this optimizer is 'SGD'"):
        sgd.load_checkpoint(tmp_path)
    assert all(torch.equal(p, b) for p, b in zip(sgd.module.parameters(), before)), "the model is untouched"


# --- paths --------------------------------------------------------------------------------------

@pytest.mark.parametrize("tag", ["latest", "LATEST", ".hidden", ".tmp-save-x", "..", "../x", "a/b", "a\\b", "",
                                 "x" * 300, "a\nb"])
def test_reserved_and_unsafe_tags_are_refused_at_save(tmp_path, tag):
    with pytest.raises(ValueError, match=r"tag .* is not allowed"):
        checkpoint.save(tmp_path, m := Net(), tag=tag, index=ExpertIndex.build(m))
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("pointer", ["../outside", "/etc", "a/b", "..", ".tmp-save-x", "", "latest"])
def test_latest_must_name_a_folder_inside_the_directory(tmp_path, pointer):
    checkpoint.save(tmp_path / "ck", m := Net(), tag="t", index=ExpertIndex.build(m))
    (tmp_path / "outside").mkdir()
    shutil.copytree(tmp_path / "ck" / "t", tmp_path / "outside" / "t")  # a valid checkpoint one level up
    (tmp_path / "ck" / "latest").write_text(pointer)
    with pytest.raises(CheckpointError, match=r"latest: .* does not name a checkpoint folder inside"):
        checkpoint.load(tmp_path / "ck", m := Net(), index=ExpertIndex.build(m))
    with pytest.raises(CheckpointError, match="does not name a checkpoint folder inside"):
        checkpoint.load(tmp_path / "ck", m := Net(), tag=pointer or "..", index=ExpertIndex.build(m))


def test_layer_names_are_encoded_and_cannot_escape_the_checkpoint(tmp_path):
    model = Net(name="../../../x")
    root = tmp_path / "a" / "b" / "ck"
    folder = checkpoint.save(root, model, tag="t", index=ExpertIndex.build(model))
    outside = [p for p in tmp_path.rglob("*") if root not in p.parents and p != root and p not in root.parents]
    assert outside == [], outside
    assert (folder / "experts" / encode_component("../../../x")).is_dir()
    fresh = Net(name="../../../x")
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    checkpoint.load(root, fresh, index=ExpertIndex.build(fresh))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))


def test_encoding_is_safe_and_distinct():
    for name in ["ffn", "blocks.0.ffn", "../x", ".", "..", "a/b", "a@1", "100%", "x" * 500, "ü", "", " "]:
        enc = encode_component(name)
        assert "/" not in enc and "@" not in enc and not enc.startswith(".") and 0 < len(enc) <= 200
    assert encode_component("blocks.0.ffn") == "blocks.0.ffn"
    names = ["a/b", "a%2Fb", "a_b", "x" * 300, "x" * 301]
    assert len({encode_component(n) for n in names}) == len(names)


def test_a_manifest_path_that_leaves_the_folder_is_refused(saved):
    root, folder = saved
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("manifest_crc32")
    manifest["experts"]["ffn"]["0"] = "../../evil.safetensors"
    (folder / "manifest.json").write_bytes(seal(manifest))
    with pytest.raises(CheckpointError, match=r"'../../evil.safetensors' is not a plain path inside"):
        make_engine().load_checkpoint(root)


# --- publication: re-saves, leftovers, keep_last, crashes ---------------------------------------

def test_resaving_a_tag_publishes_beside_the_old_one_then_removes_it(tmp_path):
    engine = make_engine()
    first = engine.save_checkpoint(tmp_path, tag="best")
    train(engine, 1)
    second = engine.save_checkpoint(tmp_path, tag="best")
    assert first.name == "best" and second.name == "best@1" and not first.exists()
    assert (tmp_path / "latest").read_text() == "best@1"
    fresh = make_engine()
    fresh.load_checkpoint(tmp_path, tag="best")
    assert fresh.global_steps == 1
    third = engine.save_checkpoint(tmp_path, tag="best")
    assert third.name == "best@2" and sorted(p.name for p in tmp_path.iterdir()) == ["best@2", "latest"]
    assert checkpoint.resolve(tmp_path, "best@2") == third == checkpoint.resolve(tmp_path, "best")


def test_leftovers_of_killed_saves_are_removed_at_the_next_save(tmp_path):
    checkpoint.save(tmp_path, m := Net(), tag="a", index=ExpertIndex.build(m))
    (tmp_path / ".tmp-save-b" / "experts").mkdir(parents=True)
    (tmp_path / ".tmp-save-b" / "experts" / "x.safetensors").write_bytes(b"junk")
    (tmp_path / ".tmp-del-0123").mkdir()
    (tmp_path / ".tmp-latest-0123").write_text("b")
    (tmp_path / "notes").mkdir()  # not ours: never touched
    checkpoint.save(tmp_path, m := Net(), tag="c", index=ExpertIndex.build(m))
    assert _transient(tmp_path) == [] and (tmp_path / "notes").is_dir()


def test_keep_last_prunes_the_oldest_and_never_what_latest_names(tmp_path):
    engine = make_engine()
    for step in range(5):
        train(engine, 1)
        engine.save_checkpoint(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step4", "global_step5", "latest"]
    engine.save_checkpoint(tmp_path, tag="global_step4", keep_last=2)  # a re-save counts as the newest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step4@1", "global_step5", "latest"]
    engine.save_checkpoint(tmp_path, tag="x", keep_last=3)
    (tmp_path / "latest").write_text("global_step5")  # as if a crash left latest on the oldest
    assert tidy(tmp_path, 1) == ["global_step4@1"], "the newest and the one latest names stay"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step5", "latest", "x"]
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="keep_last must be None .* or an int >= 1"):
            engine.save_checkpoint(tmp_path, keep_last=bad)


class _Crash(BaseException):
    """What a SIGKILL would do to the saving process, at a chosen file-system operation."""


def _crash_at(monkeypatch, root, n):
    """Make the n-th mutating file-system call under ``root`` raise _Crash (the call does not happen)."""
    count = [0]

    def wrap(fn, path_args=(0,)):
        def inner(*args, **kwargs):
            if any(str(root) in str(args[i]) for i in path_args if i < len(args)):
                count[0] += 1
                if count[0] == n:
                    raise _Crash(f"crash at operation {n}: {fn.__name__}{args[:2]}")
            return fn(*args, **kwargs)
        return inner

    real_fsync = os.fsync
    for name, idx in (("rename", (0, 1)), ("replace", (0, 1)), ("mkdir", (0,)), ("unlink", (0,)), ("rmdir", (0,)),
                      ("open", (0,))):
        monkeypatch.setattr(os, name, wrap(getattr(os, name), idx))
    monkeypatch.setattr(shutil, "rmtree", wrap(shutil.rmtree))

    def fsync(fd):  # fsyncs count too: a crash between write and fsync is an instant of its own
        count[0] += 1
        if count[0] == n:
            raise _Crash(f"crash at operation {n}: fsync")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return count


def test_a_crash_at_every_file_system_operation_leaves_latest_loadable(tmp_path, monkeypatch):
    """Re-saving the tag ``latest`` names is the hardest case: the old folder must survive until the new one is in."""
    engine = make_engine()
    train(engine, 1)
    n, seen_new = 1, False
    while True:
        root = tmp_path / f"run{n}"
        engine.save_checkpoint(root, tag="t")
        old_step = engine.global_steps
        train(engine, 1)
        with monkeypatch.context() as m:
            _crash_at(m, root, n)
            try:
                engine.save_checkpoint(root, tag="t", keep_last=1)
                crashed = False
            except _Crash:
                crashed = True
        fresh = make_engine()
        fresh.load_checkpoint(root)  # whatever the instant, latest loads (verified)
        assert fresh.global_steps in (old_step, engine.global_steps)
        seen_new |= fresh.global_steps == engine.global_steps
        fresh.load_checkpoint(root, tag="t")
        engine.save_checkpoint(root, tag="u")  # the next save cleans up
        assert _transient(root) == [], (n, _transient(root))
        if not crashed:
            break
        n += 1
    assert n > 20 and seen_new, f"only {n} operations; the crash points did not cover a whole save"


# --- format 1 -----------------------------------------------------------------------------------

class _DSWrapped(nn.Module):
    """A MoE whose router sits at ``deepspeed_moe.gate`` (DeepSpeed's structure)."""

    def __init__(self, moe):
        super().__init__()
        self.deepspeed_moe = moe

    def forward(self, x):
        return self.deepspeed_moe(x)


class V1Net(nn.Module):
    """The architecture of tests/data/make_v1_checkpoint.py."""

    def __init__(self, deepspeed_structure=False):
        super().__init__()
        torch.manual_seed(42)  # other values than the checkpoint's
        self.inp = nn.Linear(4, 4)
        moe = moesaic.MoE(4, nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4)), num_experts=2, k=1,
                          expert_group_name="ffn")
        has_ds = any(k.startswith("deepspeed_moe.gate.") for k in moe.state_dict())
        self.ffn = _DSWrapped(moe) if deepspeed_structure and not has_ds else moe

    def forward(self, x):
        out, l_aux, _ = self.ffn(torch.tanh(self.inp(x)))
        return out.pow(2).mean() + 0.01 * l_aux


def _v1_engine(deepspeed_structure=False):
    engine, *_ = moesaic.initialize(model=V1Net(deepspeed_structure), config={
        "train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}})
    return engine


@pytest.mark.parametrize("deepspeed_structure", [False, True])
def test_a_format1_checkpoint_loads_exactly(tmp_path, deepspeed_structure):
    ck = tmp_path / "ck"
    shutil.copytree(DATA / "v1_checkpoint", ck)
    expected = json.loads((DATA / "v1_expected.json").read_text())
    engine = _v1_engine(deepspeed_structure)
    dense_keys = set(engine.module.state_dict())
    if deepspeed_structure:
        assert "ffn.deepspeed_moe.gate.wg.weight" in dense_keys and "ffn.gate.wg.weight" not in dense_keys
    _, client = engine.load_checkpoint(ck)
    assert torch.equal(torch.randn(3), torch.tensor(expected["next_randn"])), "RNG restored"
    assert client == {"note": "format 1", "position": [3, 4]} and engine.global_steps == expected["global_steps"]
    saved = load_file(ck / "step2" / "dense.safetensors")
    gate = next(k for k in dense_keys if k.endswith("gate.wg.weight"))
    assert torch.equal(engine.module.state_dict()[gate], saved["ffn.gate.wg.weight"])
    assert int(engine.optimizer.state_dict()["state"][gate]["step"]) == 2
    saved_optim = load_file(ck / "step2" / "experts" / "ffn" / "1.optim.safetensors")
    state = engine.optimizer.state_dict()["state"]
    assert torch.equal(state["ffn/1/0.weight"]["exp_avg"], saved_optim["0.weight::exp_avg"])
    engine.module.eval()
    with torch.no_grad():
        out, _, _ = engine.module.ffn(torch.tanh(engine.module.inp(torch.tensor(expected["input"]))))
    torch.testing.assert_close(out, torch.tensor(expected["output"]), rtol=1e-6, atol=1e-7)
    checkpoint.verify(ck)
    # saving again writes format 2 beside it, and that loads too
    folder = engine.save_checkpoint(ck)
    assert checkpoint.read_manifest(folder)["format_version"] == 2
    _v1_engine(deepspeed_structure).load_checkpoint(ck)


def test_a_format2_checkpoint_with_the_old_router_name_loads_into_deepspeeds_structure(tmp_path):
    old, new = _v1_engine(), _v1_engine(deepspeed_structure=True)
    torch.manual_seed(3)
    for _ in range(2):
        old.backward(old(torch.randn(8, 4)))
        old.step()
    folder = old.save_checkpoint(tmp_path)
    saved_names = set(checkpoint.read_manifest(folder)["files"]["dense.safetensors"]["tensors"])
    new.load_checkpoint(tmp_path)
    old_sd, new_sd = old.module.state_dict(), new.module.state_dict()
    old_opt, new_opt = old.optimizer.state_dict()["state"], new.optimizer.state_dict()["state"]
    for name in saved_names:  # the router's name differs when the structures differ; values never
        target = name if name in new_sd else name.replace("ffn.gate.", "ffn.deepspeed_moe.gate.")
        assert torch.equal(new_sd[target], old_sd[name]), name
        if name in old_opt:
            assert all(torch.equal(new_opt[target][k], v) for k, v in old_opt[name].items()), name


def test_a_format1_checkpoint_is_still_verified(tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(DATA / "v1_checkpoint", ck)
    f = ck / "step2" / "engine.json"
    f.write_text(f.read_text().replace('"global_steps": 2', '"global_steps": 9'))
    with pytest.raises(CheckpointError, match=r"engine.json: checksum mismatch"):
        _v1_engine().load_checkpoint(ck)
    shutil.copy(DATA / "v1_checkpoint" / "step2" / "engine.json", f)
    _edit_dtype(ck / "step2" / "dense.safetensors", "inp.weight", "I32")  # format 1's CRC covers bytes only
    with pytest.raises(CheckpointError, match=r"'inp.weight' is torch.int32 in the checkpoint but torch.float32"):
        _v1_engine().load_checkpoint(ck)


def test_router_names_are_upgraded_to_deepspeeds_structure_only_where_the_model_needs_it():
    model = {"inp.weight", "blocks.0.ffn.deepspeed_moe.gate.wg.weight", "gate.weight"}
    saved = ["inp.weight", "blocks.0.ffn.gate.wg.weight", "gate.weight", "other.gate.x"]
    assert upgrade_dense_names(saved, model) == {
        "blocks.0.ffn.gate.wg.weight": "blocks.0.ffn.deepspeed_moe.gate.wg.weight"}
    assert upgrade_dense_names(["ffn.gate.wg.weight"], {"ffn.gate.wg.weight"}) == {}
    # both names saved: nothing is guessed
    assert upgrade_dense_names(["a.gate.w", "a.deepspeed_moe.gate.w"], {"a.deepspeed_moe.gate.w"}) == {}


# --- ZeRO preparation: who writes an optimizer entry -------------------------------------------

class _ShardedView:
    """An optimizer that writes only the entries ``keep`` selects (as one ZeRO rank would)."""

    def __init__(self, optimizer, keep):
        self._opt, self._keep = optimizer, keep

    def __getattr__(self, name):
        return getattr(self._opt, name)

    def writes_state(self, name):
        return self._keep(name)


def test_an_optimizer_entry_nobody_writes_fails_the_save(tmp_path):
    engine = make_engine()
    train(engine, 1)
    view = _ShardedView(engine.optimizer, lambda name: name != "inp.bias")
    with pytest.raises(CheckpointError, match=r"no rank wrote the optimizer state of \['inp.bias'\]"):
        checkpoint.save(tmp_path, engine.module, tag="t", optimizer=view, index=engine.index)
    assert not (tmp_path / "latest").exists()
