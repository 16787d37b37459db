"""The layout-invariance matrix (issue 24, item 5): one model, one batch stream, every layout.

A *layout* is (W, ep_size, ZeRO stage, expert storage, routing, recompute). Every layout trains the
same model on the same stream of micro-batches for three AdamW steps (clipping at ``CLIP``): a
step is ``MICRO`` micro-batches of ``TOKENS`` tokens, spread over the W ranks, so rank r runs
micro-batches ``r * MICRO/W .. (r+1) * MICRO/W - 1`` with ``gradient_accumulation_steps = MICRO/W``
(W=1 accumulates all eight). Each micro-batch is routed where it was at W=1 (capacity is computed
from a micro-batch's own tokens), so capacity routing with drops and the balance loss (in the
loss) are layout-invariant too.

For each layout, against W=1, ZeRO stage 0, no recompute, same storage and routing (the
reference), within ``ATOL``/``RTOL`` (fp32 round-off):

* the global loss of every step (the mean over all micro-batches of all ranks);
* the global gradient norm of every step (``engine.get_global_grad_norm()``, before clipping);
* every gradient of every step (``safe_get_full_grad``, experts by global number): the routers'
  gradients; the gradient of layer 0's expert ``MARKED``, which only micro-batch 0 of a step
  routes to, so at W > 1 some rank's copy of it (ep_size 1) or some expert-parallel group's
  sends (ep_size > 1) receive no tokens; the gradient of expert ``NEVER`` (never chosen: exactly 0);
* the expert loads (each layer's ``exp_counts`` summed over micro-batches and ranks): equal exactly;
* every parameter after the three steps (``safe_get_full_fp32_param``).

The module holds the model, the stream and the runner; tests/distributed/test_invariance.py runs
a CI subset, ``make invariance`` the whole matrix (``MOESAIC_INVARIANCE=full``). Each world size is
one process group that runs many layouts in turn.
"""

from __future__ import annotations

import itertools
import time
import zlib
from typing import Dict, List, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

import moesaic
from moesaic.layer.experts import ExpertContainer

D, E, F, TOKENS, MICRO, STEPS, CLIP, LAYERS = 8, 8, 16, 6, 8, 3, 0.05, 2
MARKED, NEVER = 6, 7  # layer 0: routed to by micro-batch 0 of each step only / by nothing
AUX = 0.01
ATOL, RTOL = 2e-6, 1e-5
RECOMPUTE_ON = ("block", "moe", "experts")


class Layout(NamedTuple):
    world: int
    ep: int
    stage: int
    stacked: bool
    capacity: bool
    recompute: str

    def __str__(self) -> str:
        return (f"W={self.world} ep={self.ep} stage={self.stage} {'stacked' if self.stacked else 'per-module'} "
                f"{'capacity' if self.capacity else 'dropless'} recompute={self.recompute}")


def reference_of(lay: Layout) -> Layout:
    return Layout(1, 1, 0, lay.stacked, lay.capacity, "none")


class Block(nn.Module):
    def __init__(self, i: int, ep: int, stacked: bool, capacity: bool) -> None:
        super().__init__()
        expert = nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, D))
        # capacity: max(ceil(6 / 8 * 1.0 * 2), 2) = 2 slots per expert, so tokens are dropped
        self.moe = moesaic.MoE(D, expert, num_experts=E, ep_size=ep, k=2, capacity_factor=1.0, min_capacity=2,
                               drop_tokens=capacity, use_rts=False, top2_2nd_expert_sampling=False,
                               expert_group_name=f"blocks.{i}.moe", router_bias=True, stacked_experts=stacked)
        self.dense = nn.Linear(D, D)

    def forward(self, h, aux):
        out, l_aux, _ = self.moe(h)
        h = h + out
        return h + torch.tanh(self.dense(h)), aux + l_aux


class Net(nn.Module):
    """MoE then a dense residual, twice; the first MoE layer sees the input itself (its routing is forced)."""

    def __init__(self, ep: int, stacked: bool, capacity: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(i, ep, stacked, capacity) for i in range(LAYERS)])
        self.out = nn.Linear(D, D)

    def forward(self, x, y):
        h, aux = x, torch.zeros((), dtype=torch.float32)
        for block in self.blocks:
            h, aux = block(h, aux)
        return (self.out(h) - y).pow(2).mean() + AUX * aux


def _randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.3


def build(lay: Layout) -> Net:
    """The model at a layout: the same weights everywhere, seeded by name and global expert number."""
    model = Net(lay.ep, lay.stacked, lay.capacity)
    moesaic.setup_expert_parallel(model)
    with torch.no_grad():
        experts = {id(p) for m in model.modules() if isinstance(m, ExpertContainer) for p in m.parameters()}
        for name, p in model.named_parameters():
            if id(p) not in experts:
                p.copy_(_randn(p.shape, zlib.crc32(name.encode())))
        for li, block in enumerate(model.blocks):
            container = block.moe.experts
            for n in container.local_numbers:
                container.load_expert_state_dict(n, {k: _randn(v.shape, 100 * li + n)
                                                     for k, v in container.expert_state_dict(n).items()})
        gate = model.blocks[0].moe.gate.wg
        gate.weight[MARKED].zero_()
        gate.weight[MARKED, 0] = 8.0  # chosen exactly by the tokens whose feature 0 is positive
        gate.bias[MARKED] = 0.0
        gate.bias[NEVER] = -1e4  # never chosen
    if lay.recompute != "none":
        moesaic.apply_recompute(model, lay.recompute)
    return model


def micro_batch(step: int, m: int):
    """Micro-batch ``m`` (0..MICRO-1) of step ``step``: feature 0 negative, except two tokens of micro-batch 0."""
    g = torch.Generator().manual_seed(1000 * step + m)
    x, y = torch.randn(TOKENS, D, generator=g), torch.randn(TOKENS, D, generator=g)
    x[:, 0] = -x[:, 0].abs() - 1.0
    if m == 0:
        x[:2, 0] = 2.0
    return x, y


def _containers(model) -> Dict[str, ExpertContainer]:
    return {path: m for path, m in model.named_modules() if isinstance(m, ExpertContainer)}


def canonical(model, read) -> Dict[str, torch.Tensor]:
    """``read(param)`` for every parameter, expert tensors split and keyed by global expert number."""
    containers = _containers(model)
    out = {}
    for name, p in model.named_parameters():
        value = read(p)
        if value is None:
            continue
        value = value.detach().float().clone()
        prefix = next((c for c in containers if name.startswith(c + ".")), None)
        if prefix is None:
            out[name] = value
            continue
        container, rest = containers[prefix], name[len(prefix) + 1:]
        numbers = container.local_numbers
        if rest.startswith("deepspeed_experts."):
            _, i, sub = rest.split(".", 2)
            out[f"{prefix}#e{numbers[int(i)]}.{sub}"] = value
        else:  # stacked: [local experts, ...]
            for i, n in enumerate(numbers):
                out[f"{prefix}#e{n}.{rest}"] = value[i]
    return out


def _config(lay: Layout) -> dict:
    return {"train_micro_batch_size_per_gpu": TOKENS, "gradient_accumulation_steps": MICRO // lay.world,
            "gradient_clipping": CLIP, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
            "zero_optimization": {"stage": lay.stage}}


def run_layout(rank: int, lay: Layout) -> dict:
    """Train one layout for STEPS steps; what it must equal the reference in (see module docstring)."""
    world = dist.get_world_size()
    assert world == lay.world, (world, lay)
    model = build(lay)
    engine, *_ = moesaic.initialize(model=model, config=_config(lay))
    accum = MICRO // world
    losses, norms, grads, local_counts = [], [], [], []
    loads = torch.zeros(LAYERS, E, dtype=torch.int64)
    for step in range(STEPS):
        total = torch.zeros((), dtype=torch.float64)
        counts = torch.zeros(LAYERS, E, dtype=torch.int64)
        for j in range(accum):
            x, y = micro_batch(step, rank * accum + j)
            loss = engine(x, y)
            for li, block in enumerate(model.blocks):
                counts[li] += block.moe.exp_counts.to(torch.int64)
            total += loss.detach().double()
            engine.backward(loss)
            if j == accum - 1:
                grads.append(canonical(model, moesaic.safe_get_full_grad))
            engine.step()
        local_counts.append(counts.clone())
        loads += counts
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total) / MICRO)
        norms.append(float(engine.get_global_grad_norm()))
    if world > 1:
        dist.all_reduce(loads)
    params = canonical(model, moesaic.safe_get_full_fp32_param)
    # did layer 0's marked expert receive no tokens on some rank (ep 1: its copy there; ep > 1: from this rank)?
    sent = torch.stack(local_counts).sum(0)[0, MARKED].reshape(1)
    if world > 1:
        everyone = [torch.zeros_like(sent) for _ in range(world)]
        dist.all_gather(everyone, sent)
        sent = torch.cat(everyone)
    return {"losses": losses, "norms": norms, "grads": grads, "loads": loads, "params": params,
            "marked_sent_per_rank": sent.tolist()}


def _compare(tag: str, what: str, got: torch.Tensor, ref: torch.Tensor, worst: dict) -> None:
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL, msg=lambda m: f"{tag}: {what}: {m}")
    err = float((got - ref).abs().max()) if got.numel() else 0.0
    worst[what.split("[")[0]] = max(worst.get(what.split("[")[0], 0.0), err)


def check_layout(lay: Layout, got: dict, ref: dict) -> dict:
    """Assert ``got`` equals the reference (see module docstring); returns the largest differences seen."""
    tag, worst = str(lay), {}
    assert len(got["norms"]) == STEPS
    _compare(tag, "loss", torch.tensor(got["losses"], dtype=torch.float64),
             torch.tensor(ref["losses"], dtype=torch.float64), worst)
    _compare(tag, "grad norm", torch.tensor(got["norms"], dtype=torch.float64),
             torch.tensor(ref["norms"], dtype=torch.float64), worst)
    assert all(n > CLIP for n in ref["norms"]), (tag, "clipping must act", ref["norms"])
    assert torch.equal(got["loads"], ref["loads"]), (tag, "expert loads", got["loads"], ref["loads"])
    for step, (g, r) in enumerate(zip(got["grads"], ref["grads"])):
        assert g, (tag, "no gradients")
        for key, value in g.items():
            kind = "router grad" if ".gate." in key else ("expert grad" if "#e" in key else "dense grad")
            if key.startswith("blocks.0.") and f"#e{MARKED}." in key:
                kind = "marked expert grad"
                assert value.abs().sum() > 0, (tag, key, "the marked expert must have a gradient")
            if key.startswith("blocks.0.") and f"#e{NEVER}." in key:
                assert torch.count_nonzero(value) == 0, (tag, key, "never-chosen expert: gradient exactly 0")
            _compare(tag, f"{kind}[{key} step {step}]", value, r[key], worst)
    for key, value in got["params"].items():
        _compare(tag, f"param after {STEPS} steps[{key}]", value, ref["params"][key], worst)
    if lay.world > 1:
        assert 0 in got["marked_sent_per_rank"], (tag, "some rank routes no token to the marked expert",
                                                  got["marked_sent_per_rank"])
    return worst


# The CI subset (``make test``): every stage, ep size, storage, routing and recompute value at W > 1;
# stage 3 on a one-rank expert mesh (W=2 ep 2), an EDP mesh of 2 (W=4 ep 2) and over the world
# (W=2 ep 1). W=1 runs the references only. Each world size is one process group.
CI = (
    Layout(2, 1, 3, False, True, "block"),
    Layout(2, 2, 3, True, False, "none"),
    Layout(2, 2, 2, False, False, "moe"),
    Layout(4, 2, 3, False, True, "experts"),
    Layout(4, 4, 1, True, False, "none"),
    Layout(4, 1, 0, True, True, "block"),
)


def layouts(world: int, full: bool) -> List[Layout]:
    """Every layout of one world size (``full``), or the CI subset.

    The full matrix: every ep_size dividing W, stage 0-3, per-module/stacked, dropless/capacity,
    recompute off and on; "on" takes the policies ``block``, ``moe`` and ``experts`` in turn.
    """
    if not full:
        return [lay for lay in CI if lay.world == world]
    eps = [p for p in (1, 2, 4) if world % p == 0 and E % p == 0]
    out = []
    for i, (ep, st, sk, cap) in enumerate(itertools.product(eps, range(4), (False, True), (False, True))):
        out += [Layout(world, ep, st, sk, cap, "none"), Layout(world, ep, st, sk, cap, RECOMPUTE_ON[i % 3])]
    return out


def world_worker(rank: int, world: int, full: bool, ref_path: str, report_path: str) -> None:
    """All layouts of one world size in one process group; W=1 also writes the references."""
    if world == 1:
        refs = {}
        for stacked, capacity in itertools.product((False, True), (False, True)):
            lay = Layout(1, 1, 0, stacked, capacity, "none")
            refs[lay] = run_layout(rank, lay)
        torch.save({tuple(k): v for k, v in refs.items()}, ref_path)
    refs = {Layout(*k): v for k, v in torch.load(ref_path, weights_only=False).items()}
    report = []
    for lay in layouts(world, full):
        t0 = time.perf_counter()
        got = run_layout(rank, lay)
        worst = check_layout(lay, got, refs[reference_of(lay)])
        report.append((str(lay), worst, time.perf_counter() - t0))
    if rank == 0:
        torch.save(report, report_path)
