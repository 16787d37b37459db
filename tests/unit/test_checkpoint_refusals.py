"""A refused load changes nothing; every JSON value is checked by type and range; hostile files are refused.

Each case edits one file of a valid checkpoint and rewrites the manifest to match (size and
CRC-32), so that only the new checks can refuse it, then checks that the load raises a
CheckpointError naming the file and the key and that the engine is bit for bit as it was: model,
optimizer state and settings, scheduler, counters, torch's and Python's RNG.
"""

import errno
import json
import os
import random
import shutil
import stat
import struct
import threading
import zlib

import pytest
import torch
from safetensors.torch import load_file

import moesaic
from moesaic import checkpoint
from moesaic.checkpoint import CheckpointError
from moesaic.checkpoint.files import write_tensors
from moesaic.checkpoint.manifest import seal
from support.checkpoint_net import CONFIG, Net, make_engine, train, transient_files

TAG = "global_step3"  # the first two WarmupLR steps have lr 0: the third changes the weights


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("source") / "ck"
    engine = make_engine()
    train(engine, 3)
    engine.save_checkpoint(root, client_state={"pos": 7})
    return root


@pytest.fixture
def ck(source, tmp_path):
    root = tmp_path / "ck"
    shutil.copytree(source, root)
    return root, root / TAG


def _manifest(folder):
    m = json.loads((folder / "manifest.json").read_text())
    m.pop("manifest_crc32")
    return m


def _rewrite(folder, rel, data, tensors=None):
    """Replace ``folder/rel`` by ``data`` and reseal the manifest so that size and CRC-32 match."""
    (folder / rel).write_bytes(data)
    m = _manifest(folder)
    m["files"][rel].update(bytes=len(data), crc32=zlib.crc32(data))
    if tensors is not None:
        m["files"][rel]["tensors"] = tensors
    (folder / "manifest.json").write_bytes(seal(m))


def _edit_json(folder, rel, edit):
    obj = json.loads((folder / rel).read_text())
    edit(obj)
    _rewrite(folder, rel, json.dumps(obj).encode())


def _state(engine):
    """Everything a load may change, copied."""
    sd = engine.optimizer.state_dict()
    return {
        "model": {k: v.clone() for k, v in engine.module.state_dict().items()},
        "optim": {n: {k: v.clone() for k, v in e.items()} for n, e in sd["state"].items()},
        "groups": json.dumps(sd["param_groups"], sort_keys=True),
        "scheduler": json.dumps(engine.lr_scheduler.state_dict(), sort_keys=True),
        "counters": (engine.global_steps, engine.global_samples, engine.micro_steps, engine.skipped_steps),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
    }


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _target():
    engine = make_engine()
    torch.manual_seed(1234)  # RNG states unlike the checkpoint's, so that restoring them would show
    random.seed(1234)
    return engine


def _refused(root, match, **kwargs):
    target = _target()
    before = _state(target)
    with pytest.raises(CheckpointError, match=match):
        target.load_checkpoint(root, **kwargs)
    after = _state(target)
    changed = [k for k in before if not _same(before[k], after[k])]
    assert changed == [], f"a refused load changed {changed}"


def test_a_resealed_checkpoint_without_edits_loads(ck):
    """The helpers' control: re-encoding a JSON file and resealing is not what the other tests refuse."""
    root, folder = ck
    for rel in ("rank0.json", "engine.json", "optimizer.json"):
        _edit_json(folder, rel, lambda obj: None)
    target = _target()
    before = _state(target)
    target.load_checkpoint(root)
    after = _state(target)
    assert target.global_steps == 3
    assert [k for k in before if _same(before[k], after[k])] == []  # everything a refused load must keep changed
    checkpoint.verify(root)


# --- item 3: nothing changes before everything is verified ---------------------------------------

def _python_rng(edit):
    return lambda obj: edit(obj["rng"]["python"])


RANK_EDITS = {
    "short Python RNG state": (_python_rng(lambda p: p.__setitem__(1, p[1][:100])),
                               r"rank0.json: rng.python\[1\]: must list 625 ints, got 100 values"),
    "RNG value 10**30": (_python_rng(lambda p: p[1].__setitem__(3, 10 ** 30)),
                         r"rank0.json: rng.python\[1\]\[3\]: must be an int in \[0, 4294967295\]"),
    "negative RNG value": (_python_rng(lambda p: p[1].__setitem__(0, -1)), r"rank0.json: rng.python\[1\]\[0\]"),
    "RNG position past the end": (_python_rng(lambda p: p[1].__setitem__(624, 625)),
                                  r"rank0.json: rng.python\[1\]\[624\]: must be an int in \[0, 624\]"),
    "RNG version 'x'": (_python_rng(lambda p: p.__setitem__(0, "x")), r"rank0.json: rng.python\[0\]: .*version"),
    "gauss 'abc'": (_python_rng(lambda p: p.__setitem__(2, "abc")), r"rank0.json: rng.python\[2\]"),
    "cuda_devices -1": (lambda obj: obj["rng"].__setitem__("cuda_devices", -1), r"rank0.json: rng.cuda_devices"),
    "cuda_devices 'x'": (lambda obj: obj["rng"].__setitem__("cuda_devices", "x"), r"rank0.json: rng.cuda_devices"),
    "cuda_devices 2 without states": (lambda obj: obj["rng"].__setitem__("cuda_devices", 2),
                                      r"rank0.json: rng.cuda_devices is 2 but"),
    "unknown rng key": (lambda obj: obj["rng"].__setitem__("numpy", 1), r"rank0.json: rng must be an object with"),
}


@pytest.mark.parametrize("case", list(RANK_EDITS))
def test_a_bad_rank_state_is_refused_before_anything_changes(ck, case):
    root, folder = ck
    edit, match = RANK_EDITS[case]
    _edit_json(folder, "rank0.json", edit)
    _refused(root, match)
    with pytest.raises(CheckpointError, match=match):
        checkpoint.verify(root)


ENGINE_EDITS = {
    "scheduler {'garbage': 1}": (lambda e: e.__setitem__("scheduler", {"garbage": 1}),
                                 r"engine.json: scheduler: unknown key 'scheduler.garbage'"),
    "scheduler [1, 2]": (lambda e: e.__setitem__("scheduler", [1, 2]),
                         r"engine.json: scheduler must be a JSON object or null, got list"),
    "scheduler iteration '3'": (lambda e: e["scheduler"].__setitem__("last_batch_iteration", "3"),
                                r"engine.json: scheduler: scheduler.last_batch_iteration must be an int"),
    "scheduler iteration -5": (lambda e: e["scheduler"].__setitem__("last_batch_iteration", -5),
                               r"engine.json: scheduler: scheduler.last_batch_iteration must be an int in \[-1,"),
    "global_steps 'abc'": (lambda e: e.__setitem__("global_steps", "abc"),
                           r"engine.json: global_steps must be an int in \[0, 2\*\*63 - 1\], got str 'abc'"),
    "global_steps 10**400": (lambda e: e.__setitem__("global_steps", 10 ** 400), r"engine.json: global_steps must"),
    "global_steps -2.5": (lambda e: e.__setitem__("global_steps", -2.5), r"engine.json: global_steps must"),
    "global_samples true": (lambda e: e.__setitem__("global_samples", True), r"engine.json: global_samples must"),
    "skipped_steps -1": (lambda e: e.__setitem__("skipped_steps", -1), r"engine.json: skipped_steps must"),
}


@pytest.mark.parametrize("case", list(ENGINE_EDITS))
def test_a_bad_engine_state_is_refused_before_anything_changes(ck, case):
    root, folder = ck
    edit, match = ENGINE_EDITS[case]
    _edit_json(folder, "engine.json", edit)
    _refused(root, match)


def _group(edit):
    return lambda o: edit(o["param_groups"][0])


OPTIMIZER_EDITS = {
    "lr 'abc'": (_group(lambda g: g.__setitem__("lr", "abc")),
                 r"optimizer.json: param_groups\[0\].lr \(group '.*'\) must be a number, got str"),
    "lr -1": (_group(lambda g: g.__setitem__("lr", -1.0)), r"optimizer.json: param_groups\[0\].lr .* must be a finite"),
    "lr NaN": (_group(lambda g: g.__setitem__("lr", float("nan"))), r"optimizer.json: param_groups\[0\].lr"),
    "betas [5.0]": (_group(lambda g: g.__setitem__("betas", [5.0])),
                    r"optimizer.json: param_groups\[0\].betas .* must be a list of 2 numbers in \[0, 1\)"),
    "betas [0.9, 5.0]": (_group(lambda g: g.__setitem__("betas", [0.9, 5.0])),
                         r"optimizer.json: param_groups\[0\].betas .*\[1\] must be a finite number in \[0, 1\)"),
    "eps 'x'": (_group(lambda g: g.__setitem__("eps", "x")), r"optimizer.json: param_groups\[0\].eps"),
    "name 7": (_group(lambda g: g.__setitem__("name", 7)),
               r"optimizer.json: param_groups\[0\].name must be a str, got int 7"),
    "lr_scale [1]": (_group(lambda g: g.__setitem__("lr_scale", [1])), r"optimizer.json: param_groups\[0\].lr_scale"),
    "two groups of one name": (lambda o: o["param_groups"].append(dict(o["param_groups"][0])),
                               r"optimizer.json: param_groups\[\d+\].name '.*' names two groups"),
    "optimizer 7": (lambda o: o.__setitem__("optimizer", 7), r"optimizer.json: optimizer must be"),
}


@pytest.mark.parametrize("case", list(OPTIMIZER_EDITS))
def test_bad_optimizer_settings_are_refused_before_anything_changes(ck, case):
    root, folder = ck
    edit, match = OPTIMIZER_EDITS[case]
    _edit_json(folder, "optimizer.json", edit)
    _refused(root, match)


def test_optimizer_settings_are_checked_when_loaded_directly():
    engine = make_engine()
    sd = engine.optimizer.state_dict()
    sd["param_groups"][0]["lr"] = "abc"
    before = engine.optimizer.param_groups[0]["lr"]
    with pytest.raises(TypeError, match=r"param_groups\[0\].lr \(group '.*'\) must be a number"):
        engine.optimizer.load_state_dict(sd)
    assert engine.optimizer.param_groups[0]["lr"] == before


def _optimizer_file(folder, name):
    return _manifest(folder)["optimizer"]["state"][name]


@pytest.mark.parametrize("step,match", [
    (torch.tensor([1, 2]), r"inp.weight::step must be one integer count .*shape \(2,\)"),
    (torch.tensor(float("nan")), r"inp.weight::step must be one integer count .*holding nan"),
    (torch.tensor(-3), r"inp.weight::step must be one integer count .*holding -3"),
    (torch.tensor(1.5), r"inp.weight::step must be one integer count .*holding 1.5"),
])
def test_a_bad_optimizer_step_tensor_names_its_file(ck, step, match):
    root, folder = ck
    rel = _optimizer_file(folder, "inp.weight")
    tensors = load_file(folder / rel)
    tensors["inp.weight::step"] = step
    (folder / rel).unlink()
    entry = write_tensors(folder / rel, tensors)
    _rewrite(folder, rel, (folder / rel).read_bytes(), tensors=entry["tensors"])
    _refused(root, rf"{rel}: {match}")


# --- item 5: hostile files -------------------------------------------------------------------------

def _add_header_entry(folder, rel, name, info):
    data = (folder / rel).read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + n])
    header[name] = info
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    _rewrite(folder, rel, struct.pack("<Q", len(text)) + text + data[8 + n:])


@pytest.mark.parametrize("shape", [[0, 2 ** 62, 2 ** 62], [0, 2 ** 70], [2 ** 63]])
def test_a_zero_size_tensor_with_an_absurd_shape_is_refused_by_file_and_name(ck, shape):
    root, folder = ck
    _add_header_entry(folder, "rank0.safetensors", "evil", {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]})
    match = r"rank0.safetensors: tensor 'evil' has (a malformed )?shape"
    _refused(root, match)
    with pytest.raises(CheckpointError, match=match):
        checkpoint.verify(root)


def _load_in_thread(fn, fifo_paths, timeout=20.0):
    """Run ``fn`` in a thread; if it blocks on a FIFO, unblock it (open the FIFOs for writing) and fail."""
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            result["error"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        for p in fifo_paths:
            try:
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))  # the blocked reader sees end of file
            except OSError:
                pass
        t.join(timeout)
        pytest.fail("the load blocked on a FIFO")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _replace_by_fifo(path):
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("rel", ["experts/ffn/1.safetensors", "engine.json", "manifest.json", "../latest"])
def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(ck, rel):
    root, folder = ck
    path = (folder / rel) if not rel.startswith("../") else root / rel[3:]
    _replace_by_fifo(path)
    target = _target()
    before = _state(target)
    with pytest.raises(CheckpointError, match=rf"{path.name}: is a FIFO, expected a regular file; refused without "
                                              "opening it"):
        _load_in_thread(lambda: target.load_checkpoint(root, tag=None if rel == "../latest" else TAG), [path])
    assert all(_same(before[k], v) for k, v in _state(target).items())


def test_a_fifo_manifest_in_another_folder_does_not_block_a_load_or_a_save(ck):
    root, folder = ck
    (root / "other").mkdir()
    os.mkfifo(root / "other" / "manifest.json")
    engine = _target()
    _load_in_thread(lambda: engine.load_checkpoint(root, tag=TAG), [root / "other" / "manifest.json"])
    assert engine.global_steps == 3
    _load_in_thread(lambda: engine.save_checkpoint(root, tag="next", keep_last=1),
                    [root / "other" / "manifest.json"])
    assert stat.S_ISFIFO(os.lstat(root / "other" / "manifest.json").st_mode)  # not ours: never touched


def test_a_folder_in_place_of_a_file_is_refused(ck):
    root, folder = ck
    (folder / "experts/ffn/1.safetensors").unlink()
    (folder / "experts/ffn/1.safetensors").mkdir()
    _refused(root, r"experts/ffn/1.safetensors: is a folder, expected a regular file")


def _outside(tmp_path):
    out = tmp_path / "outside"
    out.mkdir(exist_ok=True)
    return out


@pytest.mark.parametrize("rel", ["experts/ffn/1.safetensors", "experts", "experts/ffn", "engine.json",
                                 "manifest.json"])
def test_a_symbolic_link_inside_a_checkpoint_is_refused(ck, tmp_path, rel):
    """The link points at an identical copy, so only the link itself can be refused."""
    root, folder = ck
    copy = _outside(tmp_path) / "copy"
    (shutil.copytree if (folder / rel).is_dir() else shutil.copy)(folder / rel, copy)
    (shutil.rmtree if (folder / rel).is_dir() else os.unlink)(folder / rel)
    os.symlink(copy, folder / rel)
    _refused(root, rf"{rel}: is a symbolic link; a checkpoint may not contain links")


def test_a_symbolic_link_as_the_tag_folder_is_refused_and_never_pruned(ck, tmp_path):
    root, folder = ck
    moved = _outside(tmp_path) / TAG
    shutil.move(folder, moved)
    os.symlink(moved, folder)
    _refused(root, rf"{TAG}: is a symbolic link")
    _refused(root, rf"{TAG}: is a symbolic link", tag=TAG)
    engine = make_engine()
    engine.save_checkpoint(root, tag="new", keep_last=1)  # keep_last never follows nor removes the link
    assert os.path.islink(folder) and (moved / "manifest.json").is_file()


def test_a_symbolic_link_as_latest_is_refused(ck, tmp_path):
    root, folder = ck
    pointer = _outside(tmp_path) / "pointer"
    pointer.write_text(TAG)
    (root / "latest").unlink()
    os.symlink(pointer, root / "latest")
    _refused(root, r"latest: is a symbolic link")


def test_the_checkpoint_directory_itself_may_be_a_link(ck, tmp_path):
    root, folder = ck
    os.symlink(root, tmp_path / "link")
    engine = _target()
    engine.load_checkpoint(tmp_path / "link")
    assert engine.global_steps == 3


@pytest.mark.parametrize("tag", ["/etc/passwd", "../ck", "a/b", ".hidden", "latest"])
def test_a_tag_that_is_not_one_folder_name_is_refused_naming_it(ck, tag):
    root, _ = ck
    _refused(root, rf"tag: '{tag}' does not name a checkpoint folder inside the checkpoint directory", tag=tag)


def test_tags_are_names_not_patterns(ck):
    root, folder = ck
    engine = _target()
    with pytest.warns(RuntimeWarning, match=r"no checkpoint 'global_step\*' in .*: nothing loaded"):
        assert engine.load_checkpoint(root, tag="global_step*") == (None, None)
    engine.load_checkpoint(root, tag=TAG)
    for tag in ("global_step*", "best run", "a[1]"):  # saved tags with such characters load by their name
        engine.save_checkpoint(root, tag=tag)
        fresh = _target()
        path, client = fresh.load_checkpoint(root, tag=tag)
        assert path is not None and fresh.global_steps == 3, tag


def test_a_full_disk_during_a_save_names_the_checkpoint_and_the_file(ck, monkeypatch):
    root, folder = ck
    engine = make_engine()
    train(engine, 1)
    real_fsync = os.fsync

    def full(fd):  # what ext4 reports when delayed allocation finds no space
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full)
        with pytest.raises(CheckpointError, match=r"saving checkpoint 'full' in .*ck failed: \[Errno 28\] No space "
                                                  r"left on device: '.*/\.tmp-save-full/[^']+'"):
            engine.save_checkpoint(root, tag="full")
    assert (root / "latest").read_text() == TAG  # the previous checkpoint stays the one that loads
    _target().load_checkpoint(root)
    engine.save_checkpoint(root, tag="after")  # the next save removes the debris
    assert transient_files(root) == []


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.__setitem__("garbage", 1), r"engine.json: scheduler has the keys .*'garbage'"),
    (lambda s: s.__setitem__("last_epoch", "x"), r"engine.json: scheduler.last_epoch must be a number, got str"),
    (lambda s: s.__setitem__("last_epoch", 10 ** 30), r"engine.json: scheduler.last_epoch must fit in 64 bits"),
    (lambda s: s.__setitem__("_last_lr", s["_last_lr"][:1]),
     r"engine.json: scheduler._last_lr must list \d+ values, got 1"),
])
def test_a_torch_schedulers_state_is_compared_with_its_own_shape(tmp_path, edit, match):
    """torch's schedulers load any dict (``__dict__.update``): the saved state must have the live one's shape."""
    cfg = dict(CONFIG, scheduler={"type": "StepLR", "params": {"step_size": 2, "gamma": 0.5}})
    engine, *_ = moesaic.initialize(model=Net(), config=cfg)
    train(engine, 3)
    folder = engine.save_checkpoint(tmp_path / "ck")
    _edit_json(folder, "engine.json", lambda e: edit(e["scheduler"]))
    target, *_ = moesaic.initialize(model=Net(), config=cfg)
    before = json.dumps(target.lr_scheduler.state_dict(), sort_keys=True)
    groups = json.dumps(target.optimizer.state_dict()["param_groups"], sort_keys=True)
    with pytest.raises(CheckpointError, match=match):
        target.load_checkpoint(tmp_path / "ck")
    assert json.dumps(target.lr_scheduler.state_dict(), sort_keys=True) == before
    assert json.dumps(target.optimizer.state_dict()["param_groups"], sort_keys=True) == groups
    assert target.global_steps == 0


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.__setitem__("cur_scale", 0.0), r"engine.json: loss_scaler: cur_scale must be a finite number"),
    (lambda s: s.__setitem__("cur_iter", "1"), r"engine.json: loss_scaler: cur_iter must be an int"),
    (lambda s: s.pop("cur_hysteresis"), r"engine.json: loss_scaler: loss scaler state_dict lacks \['cur_hysteresis'\]"),
])
def test_a_bad_loss_scaler_state_is_refused_before_anything_changes(tmp_path, edit, match):
    cfg = dict(CONFIG, fp16={"enabled": True})
    engine, *_ = moesaic.initialize(model=Net(), config=cfg)
    for _ in range(3):
        engine.backward(engine(torch.randn(16, 8).half()))
        engine.step()
    folder = engine.save_checkpoint(tmp_path / "ck")
    _edit_json(folder, "engine.json", lambda e: edit(e["loss_scaler"]))
    target, *_ = moesaic.initialize(model=Net(), config=cfg)
    before = (dict(target.loss_scaler.state_dict()), _state(target))
    with pytest.raises(CheckpointError, match=match):
        target.load_checkpoint(tmp_path / "ck")
    assert target.loss_scaler.state_dict() == before[0]
    after = _state(target)
    assert all(_same(before[1][k], after[k]) for k in after)


class _OwnSchedule:
    """A scheduler of the user's own: its state has the right shape, but its load_state_dict refuses a value."""

    def __init__(self, optimizer):
        self.optimizer, self.n = optimizer, 0

    def step(self):
        self.n += 1

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]
        if self.n > 100:
            raise ValueError(f"n={self.n} is past the end of this schedule")


def test_a_scheduler_of_ones_own_that_refuses_its_state_is_put_back_and_nothing_else_changes(tmp_path):
    cfg = {k: v for k, v in CONFIG.items() if k != "scheduler"}
    engine, *_ = moesaic.initialize(model=Net(), config=cfg, lr_scheduler=lambda opt: _OwnSchedule(opt))
    train(engine, 3)
    folder = engine.save_checkpoint(tmp_path / "ck")
    _edit_json(folder, "engine.json", lambda e: e["scheduler"].__setitem__("n", 1000))
    target, *_ = moesaic.initialize(model=Net(), config=cfg, lr_scheduler=lambda opt: _OwnSchedule(opt))
    target.lr_scheduler.n = 5
    before = _state(target)
    with pytest.raises(CheckpointError, match=r"engine.json: scheduler: _OwnSchedule.load_state_dict refused the "
                                              r"saved state \(ValueError: n=1000 is past the end"):
        target.load_checkpoint(tmp_path / "ck")
    assert target.lr_scheduler.n == 5
    after = _state(target)
    assert all(_same(before[k], after[k]) for k in after)
    _edit_json(folder, "engine.json", lambda e: e["scheduler"].__setitem__("n", 7))
    target.load_checkpoint(tmp_path / "ck")
    assert target.lr_scheduler.n == 7 and target.global_steps == 3
