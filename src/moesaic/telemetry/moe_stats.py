"""Routing statistics of a model's MoE layers: one forward (``collect_moe_stats``) or many.

Every ``moesaic.MoE`` keeps the routing numbers of its last forward; these helpers turn them into
plain Python dicts keyed by ``expert_group_name``, ready for ``MetricsWriter``::

    {"tokens_per_expert": [...],   # routes kept per expert, after capacity (index = expert number)
     "routes_per_expert": [...],   # routes chosen per expert, before capacity
     "dropped_fraction": float,    # dropped routes / routes
     "l_aux": float, "z_loss": float, "seq_aux_loss": float,
     "unrouted_tokens": int,       # valid tokens no expert took (all routes dropped; expert choice)
     "load_imbalance": float,      # max / mean of routes_per_expert (0 when there are no routes)
     "expert_bias": [...]}         # only for a layer with an aux-loss-free bias: its value per expert

With expert parallelism the numbers of one layer cover this rank's tokens only (all ``E`` experts,
numbered globally): each rank routes its own tokens to every expert of the layer. The layer's load
over the whole run is the sum over all ranks: :meth:`MoEStatsAccumulator.all_reduce` sums the
accumulated figures over a process group (the engine does this every step, so its metrics and the
trainer's load plots show every expert with the tokens of every rank).
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..layer.moe import MixtureOfExperts, moe_layers

__all__ = ["collect_moe_stats", "MoEStatsAccumulator"]


def _moe_layers(model: nn.Module) -> Dict[str, MixtureOfExperts]:
    """``{expert_group_name: layer}`` in module order; duplicate names are an error (stats would mix)."""
    return {name: layer for name, (_, layer) in moe_layers(model).items()}


def _has_run(layer: MixtureOfExperts) -> bool:
    return layer.tokens_per_expert is not None and layer.exp_counts is not None


def _scalar(value) -> float:
    """A loss attribute (0-dim tensor or None) as a Python float; None reads as 0."""
    if value is None:
        return 0.0
    if isinstance(value, Tensor):
        return float(value.detach().float().item())
    return float(value)


def _load_imbalance(routes: List[int]) -> float:
    total = sum(routes)
    if not routes or total == 0:
        return 0.0
    return max(routes) / (total / len(routes))


def collect_moe_stats(model: nn.Module) -> Dict[str, dict]:
    """Read the routing statistics of every MoE layer's last forward.

    Layers that have not run a forward yet are skipped. Reading the numbers synchronises with
    the device (``.tolist()``), so call it once per logging step, not inside the hot loop.

    Args:
        model: a module containing ``moesaic.MoE`` layers (or an ``MoE`` itself).

    Returns:
        ``{expert_group_name: {"tokens_per_expert", "routes_per_expert", "dropped_fraction",
        "l_aux", "z_loss", "load_imbalance"}}`` (see the module docstring).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: two MoE layers share an ``expert_group_name``.
    """
    stats: Dict[str, dict] = {}
    for name, layer in _moe_layers(model).items():
        if not _has_run(layer):
            continue
        routes = [int(c) for c in layer.exp_counts.tolist()]
        stats[name] = {
            "tokens_per_expert": [int(c) for c in layer.tokens_per_expert.tolist()],
            "routes_per_expert": routes,
            "dropped_fraction": float(layer.dropped_fraction),
            "l_aux": _scalar(layer.l_aux),
            "z_loss": _scalar(layer.z_loss),
            "seq_aux_loss": _scalar(layer.seq_aux_loss),
            "unrouted_tokens": int(layer.num_unrouted_tokens),
            "load_imbalance": _load_imbalance(routes),
        }
        if layer.expert_bias is not None:
            stats[name]["expert_bias"] = [float(b) for b in layer.expert_bias.tolist()]
    return stats


class MoEStatsAccumulator:
    """Sum MoE routing statistics over several forwards (micro-batches) between ``reset()`` calls.

    Call ``update(model)`` after every micro-batch's forward and ``summary()`` once per optimizer
    step, then ``reset()``. Counts are summed on the layers' device, so ``update`` never waits
    for the device; ``summary`` does. Each forward is counted at most once: calling ``update``
    again before a layer has run another forward (or after ``reset``) adds nothing for it.
    """

    def __init__(self) -> None:
        self._seen: Dict[str, Tensor] = {}  # name -> tokens_per_expert tensor of the forward last counted
        self.reset()

    def reset(self) -> None:
        """Forget the sums (start a new step); forwards already counted stay counted."""
        self._tokens: Dict[str, Tensor] = {}
        self._routes: Dict[str, Tensor] = {}
        self._l_aux: Dict[str, Tensor] = {}
        self._z_loss: Dict[str, Tensor] = {}
        self._seq_aux_loss: Dict[str, Tensor] = {}
        self._unrouted: Dict[str, int] = {}
        self._bias: Dict[str, Tensor] = {}  # the layer's expert_bias buffer, read at summary()
        self._num_routes: Dict[str, int] = {}
        self._num_dropped: Dict[str, int] = {}
        self._forwards: Dict[str, int] = {}

    @property
    def num_forwards(self) -> Dict[str, int]:
        """Forwards counted per layer since the last ``reset()``."""
        return dict(self._forwards)

    def update(self, model: nn.Module) -> None:
        """Add the last forward of every MoE layer of ``model`` to the sums.

        Args:
            model: a module containing ``moesaic.MoE`` layers (or an ``MoE`` itself).

        Raises:
            TypeError: ``model`` is not an ``nn.Module``.
            ValueError: two MoE layers share an ``expert_group_name``, or a layer's expert count
                differs from what was accumulated under its name.
        """
        for name, layer in _moe_layers(model).items():
            if not _has_run(layer) or self._seen.get(name) is layer.tokens_per_expert:
                continue
            tokens = layer.tokens_per_expert.detach().to(torch.int64)
            routes = layer.exp_counts.detach().to(torch.int64)
            l_aux = torch.as_tensor(0.0 if layer.l_aux is None else layer.l_aux.detach(), dtype=torch.float64)
            z_loss = torch.as_tensor(0.0 if layer.z_loss is None else layer.z_loss.detach(), dtype=torch.float64)
            seq_aux = torch.as_tensor(0.0 if layer.seq_aux_loss is None else layer.seq_aux_loss.detach(),
                                      dtype=torch.float64)
            if name not in self._forwards:
                self._tokens[name] = tokens.clone()
                self._routes[name] = routes.clone()
                self._l_aux[name] = l_aux.clone()
                self._z_loss[name] = z_loss.clone()
                self._seq_aux_loss[name] = seq_aux.clone()
                self._unrouted[name] = 0
                self._num_routes[name] = 0
                self._num_dropped[name] = 0
                self._forwards[name] = 0
            else:
                if tokens.numel() != self._tokens[name].numel():
                    raise ValueError(f"MoE layer {name!r} has {tokens.numel()} experts but "
                                     f"{self._tokens[name].numel()} were accumulated under that name; "
                                     "call reset() before switching models")
                device = self._tokens[name].device
                self._tokens[name] += tokens.to(device)
                self._routes[name] += routes.to(device)
                self._l_aux[name] += l_aux.to(device)
                self._z_loss[name] += z_loss.to(device)
                self._seq_aux_loss[name] += seq_aux.to(device)
            self._unrouted[name] += int(layer.num_unrouted_tokens)
            if layer.expert_bias is not None:
                self._bias[name] = layer.expert_bias
            self._num_routes[name] += int(layer.num_routes)
            self._num_dropped[name] += int(layer.num_dropped_routes)
            self._forwards[name] += 1
            self._seen[name] = layer.tokens_per_expert

    def all_reduce(self, group=None) -> None:
        """Sum the figures accumulated so far over the ranks of ``group`` (collective: every rank calls it).

        Afterwards :meth:`summary` describes the tokens of all ranks: tokens and routes per expert
        are the sums, ``dropped_fraction`` is the share of all ranks' routes, ``l_aux`` and ``z_loss``
        are averaged over every forward of every rank. Every rank must have accumulated the same
        layers (true whenever the ranks run the same model: with ``ep_size > 1`` each forward is
        itself collective). One collective for all layers; a no-op on one process.

        Args:
            group: the process group (default: the world).
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return
        names = sorted(self._forwards)
        if not names:
            return
        device = self._tokens[names[0]].device
        # per layer: tokens (E), routes (E), l_aux, z_loss, routes, dropped routes, forwards; float64 holds
        # counts exactly up to 2**53
        parts = []
        for name in names:
            parts += [self._tokens[name].to(device, torch.float64), self._routes[name].to(device, torch.float64),
                      torch.tensor([float(self._l_aux[name]), float(self._z_loss[name]), self._num_routes[name],
                                    self._num_dropped[name], self._forwards[name]], dtype=torch.float64,
                                   device=device)]
        flat = torch.cat(parts)
        dist.all_reduce(flat, group=group)
        offset = 0
        for name in names:
            E = self._tokens[name].numel()
            self._tokens[name] = flat[offset:offset + E].round().to(torch.int64)
            self._routes[name] = flat[offset + E:offset + 2 * E].round().to(torch.int64)
            l_aux, z_loss, routes, dropped, forwards = flat[offset + 2 * E:offset + 2 * E + 5].tolist()
            self._l_aux[name] = torch.tensor(l_aux, dtype=torch.float64)
            self._z_loss[name] = torch.tensor(z_loss, dtype=torch.float64)
            self._num_routes[name], self._num_dropped[name] = int(round(routes)), int(round(dropped))
            self._forwards[name] = int(round(forwards))
            offset += 2 * E + 5

    def summary(self) -> Dict[str, dict]:
        """The accumulated statistics, one dict per layer (the shape ``collect_moe_stats`` returns).

        Returns:
            ``{expert_group_name: stats}`` with tokens and routes per expert summed over the
            forwards, ``dropped_fraction`` = dropped routes / routes over all of them, ``l_aux``
            ``z_loss`` and ``seq_aux_loss`` averaged, ``unrouted_tokens`` summed, ``load_imbalance``
            of the summed routes, ``expert_bias`` as it is now (after the step's update). Empty
            before the first ``update``.
        """
        out: Dict[str, dict] = {}
        for name, n in self._forwards.items():
            routes = [int(c) for c in self._routes[name].tolist()]
            num_routes = self._num_routes[name]
            out[name] = {
                "tokens_per_expert": [int(c) for c in self._tokens[name].tolist()],
                "routes_per_expert": routes,
                "dropped_fraction": self._num_dropped[name] / num_routes if num_routes else 0.0,
                "l_aux": float(self._l_aux[name].item()) / n,
                "z_loss": float(self._z_loss[name].item()) / n,
                "seq_aux_loss": float(self._seq_aux_loss[name].item()) / n,
                "unrouted_tokens": self._unrouted[name],
                "load_imbalance": _load_imbalance(routes),
            }
            if name in self._bias:
                out[name]["expert_bias"] = [float(b) for b in self._bias[name].tolist()]
        return out
