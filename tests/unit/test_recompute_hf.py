"""Gradient checkpointing of the six Hugging Face families loaded with ``moesaic.hf.load``.

``model.gradient_checkpointing_enable()`` (non-reentrant and reentrant) on a converted model, in
train mode with ``output_router_logits=True`` (non-reentrant; see the test for reentrant), gives the loss, ``aux_loss`` and every gradient of
the same model without checkpointing, with per-module and stacked experts; each layer's
statistics and DeepSeek-V3's ``expert_load`` are those of one forward. (Before exact recompute,
every case raised ``CheckpointError``: the recompute saved fewer tensors than the forward.)
"""

import pytest
import torch

pytest.importorskip("transformers")

import moesaic  # noqa: E402
import moesaic.hf  # noqa: E402
from moesaic.layer.moe import iter_moe_modules  # noqa: E402

from support.hf_models import FAMILIES, batch, build  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_recompute")
    return {f: build(f, root / f) for f in FAMILIES}


def _step(model, ids, router_logits):
    model.zero_grad(set_to_none=True)
    for _, layer in iter_moe_modules(model):
        if layer.gate.config.enable_expert_bias:
            layer.gate.expert_load.zero_()
    out = model(input_ids=ids, labels=ids, output_router_logits=router_logits)
    loss = moesaic.hf.causal_lm_loss(model, out) if router_logits else out.loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    stats = {}
    for path, layer in iter_moe_modules(model):
        stats[path] = (layer.exp_counts.clone(), layer.tokens_per_expert.clone(), layer.num_routes,
                       layer.gate.expert_load.clone() if layer.gate.config.enable_expert_bias else None)
    aux = getattr(out, "aux_loss", None)
    return loss.detach(), None if aux is None else aux.detach(), grads, stats


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "per_module"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_is_exact(family, stacked, folders):
    model = moesaic.hf.load(folders[family], stacked_experts=stacked)
    model.train()
    ids = batch()
    # a reentrant checkpoint runs the first forward without autograd, so the router logits
    # transformers collects for aux_loss carry no gradient (its own blocks too): reentrant runs
    # are compared without aux_loss
    for reentrant in (False, True):
        plain = _step(model, ids, router_logits=not reentrant)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        got = _step(model, ids, router_logits=not reentrant)
        model.gradient_checkpointing_disable()
        what = f"{family} stacked={stacked} use_reentrant={reentrant}"
        assert torch.allclose(got[0], plain[0], rtol=1e-6, atol=0), f"{what}: loss {got[0]} vs {plain[0]}"
        if plain[1] is not None:
            assert torch.allclose(got[1], plain[1], rtol=1e-6, atol=0), f"{what}: aux_loss"
        assert got[2].keys() == plain[2].keys(), what
        for name, g in plain[2].items():
            scale = g.abs().max().clamp(min=1e-30)
            err = (got[2][name] - g).abs().max() / scale
            assert err <= 1e-6, f"{what}: gradient of {name} differs by {err:.2e} of its scale"
        for path, (counts, kept, routes, load) in plain[3].items():
            g_counts, g_kept, g_routes, g_load = got[3][path]
            assert torch.equal(counts, g_counts) and torch.equal(kept, g_kept) and routes == g_routes, \
                f"{what}: statistics of {path}"
            assert (load is None) == (g_load is None)
            if load is not None:
                assert torch.equal(load, g_load), f"{what}: expert_load of {path}: {g_load.tolist()} vs {load.tolist()}"


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_recompute_policies_on_a_converted_model(family, folders):
    model = moesaic.hf.load(folders[family])
    model.train()
    ids = batch()
    plain = _step(model, ids, router_logits=True)
    for policy in ("block", "moe", "experts"):
        moesaic.apply_recompute(model, policy)
        got = _step(model, ids, router_logits=True)
        assert torch.allclose(got[0], plain[0], rtol=1e-6, atol=0), policy
        for name, g in plain[2].items():
            err = (got[2][name] - g).abs().max() / g.abs().max().clamp(min=1e-30)
            assert err <= 1e-6, f"{family} {policy}: gradient of {name} differs by {err:.2e} of its scale"
        for path, stats in plain[3].items():
            assert all(a is None and b is None or (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b)
                       for a, b in zip(stats, got[3][path])), f"{family} {policy}: statistics of {path}"
    moesaic.apply_recompute(model, "none")
    assert moesaic.layer.recompute_policy(model) == "none"
