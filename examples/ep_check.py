"""Check, under torchrun, that expert parallelism reproduces data parallelism.

Every rank builds the same MoE layer twice, once with all experts (ep_size=1) and once with its
share of them (ep_size=world size), feeds its own batch to both, and compares outputs and
gradients; expert gradients are compared with the reference summed over the group.

    torchrun --nproc-per-node 2 examples/ep_check.py                 # one machine
    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29400 --rdzv-id demo examples/ep_check.py   # on each of 2 nodes

The backend is NCCL when CUDA is available, else gloo.
"""

import argparse

import torch
import torch.distributed as dist
from torch import nn

import moesaic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--dropless", action="store_true")
    args = ap.parse_args()
    rank, world = moesaic.init_distributed(timeout_s=120)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    d = 32
    kw = dict(num_experts=args.experts, k=args.k, drop_tokens=not args.dropless, use_rts=False,
              top2_2nd_expert_sampling=False, min_capacity=0)

    def expert():
        return nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    torch.manual_seed(0)
    ref = moesaic.MoE(d, expert(), ep_size=1, **kw).to(device)
    ep = moesaic.MoE(d, expert(), ep_size=world, **kw).to(device)
    moesaic.setup_expert_parallel(ep)
    L = args.experts // world
    with torch.no_grad():
        ep.gate.wg.weight.copy_(ref.gate.wg.weight)
        for i in range(L):
            for a, b in zip(ep.experts[i].parameters(), ref.experts[rank * L + i].parameters()):
                a.copy_(b)
    x = torch.randn(64, d, generator=torch.Generator().manual_seed(rank)).to(device)
    outs = []
    for layer in (ref, ep):
        xi = x.clone().requires_grad_(True)
        out, l_aux, _ = layer(xi)
        (out.square().sum() + l_aux).backward()
        outs.append((out.detach(), xi.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-5, rtol=1e-5)
    for e in range(args.experts):
        grads = [p.grad.clone() for p in ref.experts[e].parameters()]
        for g in grads:
            dist.all_reduce(g)
        if e // L == rank:
            for p, g in zip(ep.experts[e % L].parameters(), grads):
                torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)
    print(f"rank {rank}/{world} ({dist.get_backend()}): expert parallelism matches data parallelism "
          f"[experts {rank * L}..{rank * L + L - 1}, dropped routes {ep.num_dropped_routes}]", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
