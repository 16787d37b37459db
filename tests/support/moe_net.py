"""The small MoE regression net the distributed engine tests train (ZeRO, checkpoints, gradient sync).

``inp -> tanh -> MoE (4 GELU experts, k=2, dropless) -> out``, loss = MSE (+ ``aux_coef * l_aux``),
seeded so every rank and every run builds the same weights.
"""

import torch
from torch import nn

import moesaic

D, E = 8, 4


class MoENet(nn.Module):
    """Args: ep_size; aux_coef: weight of the layer's balance loss in the loss; use_rts: DeepSpeed's RTS;
    stacked: the experts as stacked tensors (one per projection) instead of modules; num_experts: E."""

    def __init__(self, ep_size: int, aux_coef: float = 0.0, use_rts: bool = True, stacked: bool = False,
                 num_experts: int = E) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.aux_coef = aux_coef
        self.inp = nn.Linear(D, D)
        self.ffn = moesaic.MoE(D, nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D)), num_experts=num_experts,
                               ep_size=ep_size, k=2, drop_tokens=False, use_rts=use_rts,
                               top2_2nd_expert_sampling=False, expert_group_name="ffn",
                               stacked_experts=stacked)
        self.out = nn.Linear(D, D)

    def forward(self, x, y):
        h, l_aux, _ = self.ffn(torch.tanh(self.inp(x)))
        loss = (self.out(h) - y).pow(2).mean()
        return loss + self.aux_coef * l_aux if self.aux_coef else loss
