"""``moesaic.hf.load(..., ep_size=2)`` on 2 gloo ranks equals ``ep_size=1``, reads and writes only its experts.

Each rank runs its own batch through the one-process model (every expert) and the expert-parallel
one: logits and every dense gradient must agree on the rank, and an expert's gradient on its owner
must be the sum over the ranks of the one-process model's (both ranks' tokens reach it). The
tensors each rank reads from the safetensors files are recorded: no rank reads another rank's
experts (per-expert tensors) or their rows (stacked tensors). ``save`` on both ranks writes one
shard per expert-parallel rank and an index, and the folder is bitwise the input.
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # support.hf_models in spawned ranks
from launch import run_ranks  # noqa: E402

import moesaic  # noqa: E402
import moesaic.hf  # noqa: E402
from moesaic.hf.files import FolderSource  # noqa: E402

CLOSE = dict(atol=1e-5, rtol=1e-5)
# gradients back through two attention layers sum the experts' outputs in another order under all-to-all:
# fp32 round-off reaches ~2e-5 on entries of size ~1
GRAD_CLOSE = dict(atol=1e-4, rtol=1e-4)


def _reads(monkeypatch_store):
    original = FolderSource.get

    def get(self, key, rows=None):
        monkeypatch_store.append((key, rows))
        return original(self, key, rows)

    FolderSource.get = get
    return original


def _worker(rank, world, folders, out_root):
    from support.hf_models import V

    torch.manual_seed(0)
    for family, folder in folders.items():
        ref = moesaic.hf.load(folder).train()
        reads = []
        original = _reads(reads)
        try:
            ep = moesaic.hf.load(folder, ep_size=2).train()
        finally:
            FolderSource.get = original
        layers = moesaic.hf.converted_layers(ep)
        E = next(iter(layers.values())).num_experts
        mine = range(rank * E // 2, (rank + 1) * E // 2)
        for path, layer in layers.items():
            assert layer.experts.local_numbers == list(mine) and layer.ep_size == 2
        # 1. only this rank's experts were read
        for key, rows in reads:
            if ".experts." in key:
                parts = key.split(".experts.")[1].split(".")
                if parts[0].isdigit():
                    assert int(parts[0]) in mine, f"rank {rank} read {key}"
                else:
                    assert rows == (mine.start, mine.stop), f"rank {rank} read rows {rows} of {key}"
        # 2. logits, dense and expert gradients
        ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(10 + rank))
        w = torch.randn(2, 6, V, generator=torch.Generator().manual_seed(20 + rank))
        outs = []
        for model in (ref, ep):
            logits = model(ids).logits
            (logits * w).sum().backward()
            outs.append(logits.detach())
        torch.testing.assert_close(outs[1], outs[0], **CLOSE, msg=lambda m: f"{family} rank {rank} logits: {m}")
        ref_params = dict(ref.named_parameters())
        for name, p in ep.named_parameters():
            if ".experts." not in name:
                torch.testing.assert_close(p.grad, ref_params[name].grad, **GRAD_CLOSE,
                                           msg=lambda m: f"{family} rank {rank} {name}: {m}")
        for path, layer in layers.items():
            ref_layer = ref.get_submodule(path)
            for n in range(E):
                want = {k: t.clone() for k, t in ref_layer.experts.expert_grads(n).items()}
                for t in want.values():
                    dist.all_reduce(t)
                if n in mine:
                    got = layer.experts.expert_grads(n)
                    for k, t in got.items():
                        torch.testing.assert_close(t, want[k], **GRAD_CLOSE,
                                                   msg=lambda m: f"{family} {path} expert {n} {k}: {m}")
        # 3. save from both ranks: bitwise the input
        out = os.path.join(out_root, family)
        moesaic.hf.save(ep, out)
        if rank == 0:
            _check_same_tensors(folder, out)
            back, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
            assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        dist.barrier()


def _all_tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def _check_same_tensors(src, out):
    a, b = _all_tensors(src), _all_tensors(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], shards


def test_ep2_equals_ep1_and_reads_and_writes_only_its_experts(tmp_path):
    from support.hf_models import build

    folders = {f: str(build(f, tmp_path / f)) for f in ("olmoe", "deepseek_v3", "gpt_oss")}
    run_ranks(_worker, 2, folders, str(tmp_path / "out"), timeout_s=400)


def _reshard_worker(rank, world, folder, ckpt):
    from support.hf_models import V

    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    ep = moesaic.hf.load(folder, ep_size=2)
    engine, *_ = moesaic.initialize(model=ep, config=config)
    for step in range(2):
        ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(100 * step + rank))
        loss = moesaic.hf.causal_lm_loss(engine, {"input_ids": ids})
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(ckpt)
    # the same checkpoint under ep_size=1 (every expert on every rank): the trained weights, expert by expert
    one = moesaic.hf.load(folder)
    again, *_ = moesaic.initialize(model=one, config=config)
    again.load_checkpoint(ckpt)
    assert again.global_steps == 2
    ones = dict(one.named_parameters())
    for name, p in ep.named_parameters():
        if ".experts." not in name:
            assert torch.equal(p, ones[name]), name
    for path, layer in moesaic.hf.converted_layers(ep).items():
        for n in layer.experts.local_numbers:
            theirs = one.get_submodule(path).experts.expert_state_dict(n)
            for k, t in layer.experts.expert_state_dict(n).items():
                assert torch.equal(t, theirs[k]), f"{path} expert {n} {k}"


def test_engine_checkpoint_of_an_ep2_model_reshards_to_ep1(tmp_path):
    from support.hf_models import build

    folder = str(build("qwen2_moe", tmp_path / "qwen2_moe"))
    run_ranks(_reshard_worker, 2, folder, str(tmp_path / "ckpt"), timeout_s=300)
