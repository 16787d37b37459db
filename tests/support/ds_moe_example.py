"""DeepSpeedExamples' ``training/cifar/cifar10_deepspeed.py`` in MoE mode, after the port to moesaic.

The script's shape is DeepSpeed's: argparse with ``--deepspeed --deepspeed_config`` (the two
arguments ``deepspeed.add_config_arguments`` adds), MoE layers built from a list of expert counts,
``--moe-param-group`` groups made with ``split_params_into_different_moe_groups_for_optimizer``,
``initialize(args=..., model=..., model_parameters=..., training_data=...)``, ``engine.local_rank``
and ``engine.bfloat16_enabled()``. The port changes the imports. What differs for a CPU test: small
random images instead of CIFAR-10, a fully connected trunk, inputs moved to ``engine.device``
(the original moves them to ``local_rank``, a CUDA index) and ``--steps`` to stop early.

Run it under torchrun (2 processes, ``--ep-world-size 2``); each rank prints ``first loss`` and
``last loss``, and rank 0 ``overlap_comm active: <bool>``.
"""

import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import moesaic as deepspeed  # the port: `import deepspeed` ...
from moesaic import MoE  # ... and `from deepspeed.moe.layer import MoE`


def add_argument():
    parser = argparse.ArgumentParser(description="CIFAR")
    parser.add_argument("--local_rank", type=int, default=-1, help="local rank passed from distributed launcher")
    parser.add_argument("--dtype", default="bf16", type=str, choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--moe", default=False, action="store_true", help="use deepspeed mixture of experts (moe)")
    parser.add_argument("--ep-world-size", default=1, type=int, help="(moe) expert parallel world size")
    parser.add_argument("--num-experts", type=int, nargs="+", default=[1],
                        help="number of experts list, MoE related.")
    parser.add_argument("--mlp-type", type=str, default="standard",
                        help="Only applicable when num-experts > 1, accepts [standard, residual]")
    parser.add_argument("--top-k", default=1, type=int, help="(moe) gating top 1 and 2 supported")
    parser.add_argument("--min-capacity", default=0, type=int, help="(moe) minimum capacity of an expert")
    parser.add_argument("--noisy-gate-policy", default=None, type=str, help="(moe) noisy gating (only supported "
                        "with top-1). Valid values are None, RSample, and Jitter")
    parser.add_argument("--moe-param-group", default=False, action="store_true",
                        help="(moe) create separate moe param groups, required when using ZeRO w. MoE")
    parser.add_argument("--steps", default=8, type=int, help="optimizer steps to run (the test's stop)")
    # what deepspeed.add_config_arguments(parser) adds
    parser.add_argument("--deepspeed", default=False, action="store_true")
    parser.add_argument("--deepspeed_config", default=None, type=str)
    return parser.parse_args()


class Net(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.fc1 = nn.Linear(3 * 8 * 8, 120)
        self.fc2 = nn.Linear(120, 84)
        self.moe = args.moe
        if self.moe:
            fc3 = nn.Linear(84, 84)
            self.moe_layer_list = []
            for n_e in args.num_experts:
                # create moe layers based on the number of experts
                self.moe_layer_list.append(
                    MoE(hidden_size=84, expert=fc3, num_experts=n_e, ep_size=args.ep_world_size,
                        use_residual=args.mlp_type == "residual", k=args.top_k, min_capacity=args.min_capacity,
                        noisy_gate_policy=args.noisy_gate_policy))
            self.moe_layer_list = nn.ModuleList(self.moe_layer_list)
            self.fc4 = nn.Linear(84, 10)
        else:
            self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        if self.moe:
            for layer in self.moe_layer_list:
                x, _, _ = layer(x)
            x = self.fc4(x)
        else:
            x = self.fc3(x)
        return x


def create_moe_param_groups(model):
    """Create separate parameter groups for each expert."""
    parameters = {"params": [p for p in model.parameters()], "name": "parameters"}
    return deepspeed.split_params_into_different_moe_groups_for_optimizer(parameters)


def main(args):
    deepspeed.init_distributed()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    trainset = torch.utils.data.TensorDataset(torch.randn(512, 3, 8, 8, generator=g),
                                              torch.randint(0, 10, (512,), generator=g))
    net = Net(args)
    parameters = filter(lambda p: p.requires_grad, net.parameters())
    if args.moe_param_group:
        parameters = create_moe_param_groups(net)
    model_engine, optimizer, trainloader, __ = deepspeed.initialize(
        args=args, model=net, model_parameters=parameters, training_data=trainset)
    assert model_engine.local_rank == int(os.environ.get("LOCAL_RANK", 0))
    target_dtype = None
    if model_engine.bfloat16_enabled():
        target_dtype = torch.bfloat16
    elif model_engine.fp16_enabled():
        target_dtype = torch.half
    criterion = nn.CrossEntropyLoss()
    first = last = None
    while model_engine.global_steps < args.steps:
        for data in trainloader:
            inputs, labels = data[0].to(model_engine.device), data[1].to(model_engine.device)
            if target_dtype is not None:
                inputs = inputs.to(target_dtype)
            outputs = model_engine(inputs)
            loss = criterion(outputs.float(), labels)
            model_engine.backward(loss)
            model_engine.step()
            first = float(loss.detach()) if first is None else first
            last = float(loss.detach())
            if model_engine.global_steps >= args.steps:
                break
    print(f"rank {model_engine.global_rank} first loss {first:.6f} last loss {last:.6f}", flush=True)
    if model_engine.global_rank == 0:
        print(f"overlap_comm active: {model_engine._overlap is not None}", flush=True)
        flops = model_engine.last_metrics.get("flops")
        if flops is not None:
            print(f"flops per token: {flops['flops_per_token']:.1f}", flush=True)
    model_engine.close()


if __name__ == "__main__":
    main(add_argument())
