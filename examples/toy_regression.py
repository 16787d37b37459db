"""End-to-end example: an MoE layer learns a piecewise-linear map, optimised per expert.

The target applies one of 4 random linear maps, chosen by which quadrant the input's first two
coordinates fall in. A dense MLP must approximate the kinks; 4 experts behind a router can
specialise. Optimizer groups are built per layer and per expert (moesaic's reason to exist), and
the script prints the loss and how the router spreads tokens over experts.

    python examples/toy_regression.py [--steps 300]
"""

import argparse
import time

import torch
from torch import nn

import moesaic


class Net(nn.Module):
    def __init__(self, d: int, num_experts: int):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.moe = moesaic.MoE(d, nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)),
                               num_experts=num_experts, k=2, capacity_factor=1.25, drop_tokens=True)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        h, l_aux, counts = self.moe(torch.relu(self.inp(x)))
        return self.out(h), l_aux, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")

    torch.manual_seed(args.seed)
    d, num_experts, batch = 32, 4, 512
    maps = torch.randn(4, d, d) / d ** 0.5

    def sample(n):
        x = torch.randn(n, d)
        region = (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()
        return x, torch.einsum("nd,nde->ne", x, maps[region])

    model = Net(d, num_experts)
    moesaic.name_moe_layers(model)
    groups = moesaic.split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "all", "lr": 3e-3, "weight_decay": 0.0})
    print(f"{len(groups)} optimizer groups:")
    for line in moesaic.describe_param_groups(groups):
        print("  " + line)
    opt = torch.optim.AdamW(groups)

    x_val, y_val = sample(4096)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = sample(batch)
        pred, l_aux, _ = model(x)
        loss = nn.functional.mse_loss(pred, y)
        opt.zero_grad(set_to_none=True)
        (loss + 0.01 * l_aux).backward()
        opt.step()
        if step == 1 or step % 50 == 0 or step == args.steps:
            with torch.no_grad():
                model.eval()
                val_pred, _, counts = model(x_val)
                model.train()
            val = nn.functional.mse_loss(val_pred, y_val).item()
            load = ", ".join(f"{c / counts.sum().item():.2f}" for c in counts.tolist())
            print(f"step {step:4d}  train mse {loss.item():.4f}  val mse {val:.4f}  l_aux {l_aux.item():.3f}  "
                  f"dropped {model.moe.dropped_fraction:.2%}  expert load [{load}]")
    baseline = nn.functional.mse_loss(torch.zeros_like(y_val), y_val).item()
    print(f"done in {time.perf_counter() - start:.1f}s; predicting zero gives val mse {baseline:.4f}")


if __name__ == "__main__":
    main()
