"""moesaic.shard_model (EP + FSDP2, ZeRO stage 3) trains as one unsharded process does.

Each rank builds the same model twice: sharded (``shard_model`` at W ranks, ep_size P) and whole
(W=1, ep_size 1, on the concatenation of every rank's batch). Three AdamW steps with clipping
through ``torch.optim`` over moesaic's per-expert groups; the global loss, every gradient
(``full_tensor``, matched by identity tag) and every parameter equal the whole model's to fp32
round-off. A rank whose local experts are made to receive no tokens still finishes (no hang) and
those experts' gradients are exactly zero.
"""

import math
import os
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # support.hf_models in spawned ranks
from launch import run_ranks  # noqa: E402

import moesaic  # noqa: E402
from moesaic.layer.identity import ExpertIndex, ExpertKey  # noqa: E402
from moesaic.optim.fsdp import clip_grad_norm_, shard_model  # noqa: E402

D, E, TOKENS, STEPS, CLIP = 8, 4, 12, 3, 0.05


class Block(nn.Module):
    def __init__(self, i, ep_size, stacked, router_bias):
        super().__init__()
        self.dense = nn.Linear(D, D)
        self.moe = moesaic.MoE(D, nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D)), num_experts=E,
                               ep_size=ep_size, k=2, drop_tokens=False, use_rts=False,
                               top2_2nd_expert_sampling=False, expert_group_name=f"blocks.{i}.moe",
                               router_bias=router_bias, stacked_experts=stacked)

    def forward(self, h):
        h = h + torch.tanh(self.dense(h))
        out, _, _ = self.moe(h)
        return h + out


class Net(nn.Module):
    def __init__(self, ep_size, stacked=False, starved=0):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(D, D)
        self.blocks = nn.ModuleList([Block(i, ep_size, stacked, starved > 0) for i in range(2)])
        self.out = nn.Linear(D, D)
        self.starved = starved

    def setup(self):
        """EP groups, then experts that differ, the same at every layout (by global number)."""
        moesaic.setup_expert_parallel(self)
        for block_i, block in enumerate(self.blocks):
            experts = block.moe.experts
            for n in experts.local_numbers:
                g = torch.Generator().manual_seed(100 * block_i + n)
                experts.load_expert_state_dict(n, {k: torch.randn(v.shape, generator=g) * 0.3
                                                   for k, v in experts.expert_state_dict(n).items()})
            if self.starved:  # the last `starved` experts are never chosen
                with torch.no_grad():
                    block.moe.gate.wg.bias.zero_()
                    block.moe.gate.wg.bias[E - self.starved:] = -1e4
        return self

    def forward(self, x, y):
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = block(h)
        return (self.out(h).float() - y).pow(2).mean()


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(TOKENS, D, generator=g), torch.randn(TOKENS, D, generator=g)


def _optimizer(model):
    groups = moesaic.split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "params"})
    return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)


def _ref_of(model):
    """``param -> reference tensor`` lookup of the whole model, by name for dense and by identity for experts."""
    by_name = dict(model.named_parameters())
    by_expert, by_stack = {}, {}
    for p in model.parameters():
        if getattr(p, "moe_expert", None) is not None:
            by_expert[(p.moe_expert, p.moe_param_name)] = p
        elif getattr(p, "moe_stacked", None) is not None:
            by_stack[(p.moe_stacked[0], p.moe_param_name)] = p

    def lookup(name, p, attr):
        if getattr(p, "moe_expert", None) is not None:
            return getattr(by_expert[(p.moe_expert, p.moe_param_name)], attr)
        if getattr(p, "moe_stacked", None) is not None:
            layer, first = p.moe_stacked
            whole = getattr(by_stack[(layer, p.moe_param_name)], attr)
            return whole[first:first + p.shape[0]]
        assert getattr(p, "allreduce", True), f"{name}: an expert parameter lost its identity tag"
        return getattr(by_name[name], attr)
    return lookup


def _run(rank, world, ep_size, stacked, param_dtype, starve):
    starve = E // max(ep_size, 2) if starve else 0  # every expert of the last EP rank
    model = shard_model(Net(ep_size, stacked, starve).setup(), param_dtype=param_dtype)
    ref = Net(1, stacked, starve).setup()
    lookup = _ref_of(ref)
    opt, ref_opt = _optimizer(model), _optimizer(ref)
    names = [g["name"] for g in opt.param_groups]
    assert any("/expert_" in n for n in names) or stacked, names
    tag = f"rank {rank} W={world} P={ep_size} stacked={stacked} dtype={param_dtype} starve={starve}"
    exact = param_dtype is None
    tol = dict(atol=2e-6, rtol=1e-5) if exact else dict(atol=2e-2, rtol=2e-2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.full_tensor(), lookup(name, p, "data"), atol=0, rtol=0)
    seen = []  # the dtype the experts compute in (their parameters as forward sees them)
    model.blocks[0].moe.experts.register_forward_pre_hook(lambda m, args: seen.append(next(m.parameters()).dtype))
    for step in range(STEPS):
        x, y = _batch(rank, step)
        loss = model(x, y)
        loss.backward()
        norm = clip_grad_norm_(model.parameters(), CLIP)
        xs, ys = zip(*(_batch(r, step) for r in range(world)))
        if exact:
            ref_loss = ref(torch.cat(xs), torch.cat(ys))
            ref_loss.backward()
        else:  # the same policy at W=1: a bf16 copy computes (the router in fp32), the fp32 model steps
            low = Net(1, stacked, starve).setup().to(torch.bfloat16)
            for block in low.blocks:
                block.moe.gate.float()
            low.load_state_dict(ref.state_dict())
            ref_loss = low(torch.cat(xs).bfloat16(), torch.cat(ys))
            ref_loss.backward()
            for p, q in zip(ref.parameters(), low.parameters()):
                p.grad = q.grad.float()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        total = loss.detach().clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total / world, ref_loss.detach(), **tol, msg=lambda m: f"{tag} loss: {m}")
        torch.testing.assert_close(norm, ref_norm, **tol, msg=lambda m: f"{tag} norm: {m}")
        for name, p in model.named_parameters():
            got, want = p.grad.full_tensor(), lookup(name, p, "grad")
            if exact:
                torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{tag} step {step} grad {name}: {m}")
            else:  # bf16 compute: the whole gradient within bf16's precision of W=1's
                assert (got - want).norm() <= 0.02 * want.norm() + 1e-4, (tag, step, name)
        if starve:  # the last EP rank's experts got no token: their gradients are exactly zero
            for block in model.blocks:
                experts = block.moe.experts
                if experts.ep_rank == ep_size - 1:
                    for n in experts.local_numbers:
                        if n < E - starve:
                            continue
                        for pname, g in experts.expert_grads(n).items():
                            full = g.full_tensor() if hasattr(g, "full_tensor") else g
                            assert torch.count_nonzero(full) == 0, (tag, n, pname)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        for name, p in model.named_parameters():
            assert p.dtype == torch.float32 and p.to_local().dtype == torch.float32, (tag, name)  # fp32 masters
            torch.testing.assert_close(p.full_tensor(), lookup(name, p, "data"), **tol,
                                       msg=lambda m: f"{tag} step {step} param {name}: {m}")
        assert math.isfinite(float(norm))
    assert set(seen) == {param_dtype or torch.float32}, (tag, seen)


def _freeze_and_scale(model, ref_or_model_opt):
    """Freeze expert blocks.0.moe/1 where it is held (found through the index); halve blocks.1.moe's lr."""
    index = ExpertIndex.build(model)
    key = ExpertKey("blocks.0.moe", 1)
    if key in index:
        for r in index.expert_refs(key):
            r.param.requires_grad_(False)
    opt = _optimizer(model)
    for g in opt.param_groups:
        if g.get("expert_group_name") == "blocks.1.moe":
            g["lr"] *= 0.5
    return opt


def _run_accumulation(rank, world, ep_size, accum=2):
    """Accumulation without a reduce per micro-batch (set_requires_gradient_sync), a frozen expert, lr_scale."""
    model = shard_model(Net(ep_size).setup(), param_dtype=None)
    ref = Net(1).setup()
    lookup = _ref_of(ref)
    opt, ref_opt = _freeze_and_scale(model, None), _freeze_and_scale(ref, None)
    frozen = {n: p.full_tensor().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert len(frozen) == (4 if ep_size == 1 or rank % ep_size == 0 else 0), (rank, sorted(frozen))
    tag = f"accumulation rank {rank} W={world} P={ep_size}"
    for step in range(STEPS):
        for micro in range(accum):
            model.set_requires_gradient_sync(micro == accum - 1)
            x, y = _batch(rank, 10 * step + micro)
            (model(x, y) / accum).backward()
            xs, ys = zip(*(_batch(r, 10 * step + micro) for r in range(world)))
            (ref(torch.cat(xs), torch.cat(ys)) / accum).backward()
        norm = clip_grad_norm_(model.parameters(), CLIP)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        torch.testing.assert_close(norm, ref_norm, atol=2e-6, rtol=1e-5, msg=lambda m: f"{tag} norm: {m}")
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.full_tensor(), lookup(name, p, "data"), atol=2e-6, rtol=1e-5,
                                       msg=lambda m: f"{tag} step {step} param {name}: {m}")
    for name, before in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name].full_tensor(), before), (tag, name)


def _worker(rank, world, cases, accumulation_ep_sizes=()):
    for case in cases:
        _run(rank, world, *case)
    for ep_size in accumulation_ep_sizes:
        _run_accumulation(rank, world, ep_size)


# (ep_size, stacked, param_dtype, starve)
@pytest.mark.parametrize("world,cases,accumulation", [
    (2, [(1, False, None, False), (2, True, None, False), (2, False, None, True), (2, False, torch.bfloat16, False)],
     [2]),
    (4, [(2, False, None, False), (1, True, None, False), (4, True, None, True), (2, True, None, True)], [2]),
])
def test_shard_model_trains_as_one_process(world, cases, accumulation):
    run_ranks(_worker, world, cases, accumulation, timeout_s=400)


def _lm_loss(model, ids, vocab):
    """Next-token cross-entropy without the router's balance loss (a per-rank statistic, not a mean over tokens)."""
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))


def _hf_worker(rank, world, folders):
    from support.hf_models import V

    import moesaic.hf

    for family, folder in folders.items():
        ref = moesaic.hf.load(folder).train()
        model = shard_model(moesaic.hf.load(folder, ep_size=2).train(), param_dtype=None)
        lookup = _ref_of(ref)
        opt, ref_opt = _optimizer(model), _optimizer(ref)
        ids = [torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(10 * step + r))
               for step in range(2) for r in range(world)]
        for step in range(2):
            mine = ids[step * world + rank]
            loss = _lm_loss(model, mine, V)
            loss.backward()
            ref_loss = _lm_loss(ref, torch.cat(ids[step * world:(step + 1) * world]), V)
            ref_loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total)
            tag = f"{family} rank {rank} step {step}"
            torch.testing.assert_close(total / world, ref_loss.detach(), atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{tag} loss: {m}")
            for name, p in model.named_parameters():
                torch.testing.assert_close(p.grad.full_tensor(), lookup(name, p, "grad"), atol=1e-4, rtol=1e-4,
                                           msg=lambda m: f"{tag} grad {name}: {m}")
            opt.step()
            ref_opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()
            for name, p in model.named_parameters():
                # AdamW's first steps are near lr * sign(grad): gradients' fp32 round-off under the
                # all-to-all's other summation order (~1e-5 on entries near 0) shows as ~1e-5 here
                torch.testing.assert_close(p.full_tensor(), lookup(name, p, "data"), atol=1e-4, rtol=1e-4,
                                           msg=lambda m: f"{tag} param {name}: {m}")


def test_shard_model_on_a_hugging_face_model(tmp_path):
    """A model from moesaic.hf.load: qwen3_moe (stacked experts, tied embeddings, a dense layer)."""
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from support.hf_models import build

    folders = {f: str(build(f, tmp_path / f)) for f in ("qwen3_moe",)}
    run_ranks(_hf_worker, 2, folders, timeout_s=400)
