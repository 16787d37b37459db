"""Train a small MoE transformer with expert parallelism + FSDP2 (ZeRO-3), a torchtitan-style loop.

``moesaic.shard_model`` shards the dense modules over every rank and each MoE layer's local experts
over its expert-data-parallel ranks; the optimizer is a plain ``torch.optim.AdamW`` over moesaic's
per-expert groups; clipping counts every parameter once across both meshes.

    torchrun --nproc-per-node 4 examples/fsdp_ep.py --ep-size 2
    torchrun --nproc-per-node 2 examples/fsdp_ep.py --ep-size 2 --stacked --accumulate 2

The backend is NCCL when CUDA is available, else gloo (FSDP2 runs on the CPU too).
"""

import argparse

import torch
import torch.distributed as dist
from torch import nn

import moesaic


class Block(nn.Module):
    def __init__(self, d, experts, ep_size, stacked, name):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.moe = moesaic.MoE(d, nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)),
                               num_experts=experts, ep_size=ep_size, k=2, drop_tokens=False,
                               expert_group_name=name, stacked_experts=stacked)

    def forward(self, h):
        h = h + self.mix(self.norm(h))
        out, l_aux, _ = self.moe(h)
        return h + out, l_aux


class Model(nn.Module):
    def __init__(self, vocab, d, layers, experts, ep_size, stacked):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, experts, ep_size, stacked, f"blocks.{i}.moe") for i in range(layers)])
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h, aux = self.embed(ids), 0.0
        for block in self.blocks:
            h, l_aux = block(h)
            aux = aux + l_aux
        logits = self.head(h).float()
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + 0.01 * aux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ep-size", type=int, default=1)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--stacked", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--fp32", action="store_true", help="compute in fp32 (default: bf16 compute, fp32 masters)")
    args = ap.parse_args()
    rank, world = moesaic.init_distributed(timeout_s=120)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    torch.manual_seed(0)  # every rank builds the same weights
    model = Model(256, 64, 2, args.experts, args.ep_size, args.stacked).to(device)
    model = moesaic.shard_model(model, param_dtype=None if args.fp32 else torch.bfloat16)
    groups = moesaic.split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "params"})
    opt = torch.optim.AdamW(groups, lr=3e-3, weight_decay=0.1)
    data = torch.Generator().manual_seed(1234 + rank)  # each rank its own batches
    for step in range(args.steps):
        for micro in range(args.accumulate):
            model.set_requires_gradient_sync(micro == args.accumulate - 1)  # reduce once per step
            ids = torch.randint(0, 256, (4, 32), generator=data).to(device)
            loss = model(ids) / args.accumulate
            loss.backward()
        norm = moesaic.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        total = loss.detach() * args.accumulate
        dist.all_reduce(total)
        if rank == 0:
            print(f"step {step}: loss {total.item() / world:.4f} grad norm {norm.item():.4f} "
                  f"({len(opt.param_groups)} optimizer groups)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
