"""Routing replay: record which experts a forward chose, and make a later forward choose them again.

Reinforcement learning on an MoE model computes a policy ratio between the rollout's forward and the
trainer's; if the trainer's routers pick other experts than the rollout did, the ratio compares
different networks. ``record_routing`` collects each MoE layer's chosen expert ids ``(S, k)`` of a
forward; ``replay_routing`` makes later forwards (weights changed in between, train mode, any
``ep_size``) send every token to exactly those experts::

    with moesaic.record_routing(model) as routes:      # {layer name: LongTensor (S, k)}
        model(batch)
    routes.save("routes.safetensors")                   # keyed by layer name
    ...                                                 # optimizer steps
    with moesaic.replay_routing(model, Routes.load("routes.safetensors")):
        loss = model(batch) ...                         # same experts for 100% of tokens

Under replay the combine weights are computed by the *current* router at the recorded experts,
so the router still gets gradients; the weights follow the layer's own rule (DeepSpeed's: k=1 the
raw probability, k>=2 renormalised over the token's k experts; ``norm_topk_prob=True``: divided by
the sum of the k scores; ``softmax_after_topk``: softmax over the k logits; sigmoid scores and
``routed_scaling_factor`` as configured). Nothing is dropped: a replayed forward is dropless
whatever the capacity factor (the recorded routes are the ones wanted). Losses (``l_aux``, the
sequence loss) are computed at the recorded experts. Routes from elsewhere (an inference engine's
per-token expert ids) are a ``{layer name: LongTensor (S, k)}`` dict. An expert-choice layer's routes
are its experts' picks instead, ``(E, C)``: the tokens each expert took (best first); replayed, each
expert takes those tokens again, with the current router's score as the combine weight (the
layer's rule; one forward per record context). Bad routes are an error naming the layer and the shapes; nothing
is re-routed silently.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .moe import moe_layers


class Routes(dict):
    """``{layer name: LongTensor (S, k)}``: the experts each token of a forward was sent to."""

    def save(self, path) -> None:
        """Write the routes as a safetensors file keyed by layer name."""
        from safetensors.torch import save_file
        save_file({name: t.detach().to("cpu", torch.int64).contiguous() for name, t in self.items()}, os.fspath(path))

    @classmethod
    def load(cls, path) -> "Routes":
        """Read routes written by :meth:`save` (or any safetensors file of int64 `(S, k)` tensors)."""
        from safetensors.torch import load_file
        return cls(load_file(os.fspath(path)))


def _layers(model: nn.Module, what: str) -> Dict[str, object]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = {name: layer for name, (_, layer) in moe_layers(model).items()}
    if not layers:
        raise ValueError(f"{what}: the model ({type(model).__name__}) has no moesaic MoE layers")
    return layers


def _expert_choice(layer) -> bool:
    return layer.gate.config.routing_type == "expert_choice"


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[Routes]:
    """Collect each MoE layer's chosen expert ids `(S, k)` of the forwards run inside (see module docstring);
    an expert-choice layer's are its experts' picked tokens `(E, C)`.

    Several forwards inside one context concatenate their tokens in call order (expert-choice layers:
    one forward per context, else a ValueError at the end). A recompute under activation
    checkpointing adds nothing.
    """
    layers = _layers(model, "record_routing")
    routes = Routes()
    parts: Dict[str, list] = {name: [] for name in layers}
    for name, layer in layers.items():
        layer._route_recorder = parts[name]
    try:
        yield routes
    finally:
        for layer in layers.values():
            layer._route_recorder = None
        failing = sys.exc_info()[0] is not None  # an error inside the context: let it through unchanged
        for name, chunks in parts.items():
            if len(chunks) > 1 and _expert_choice(layers[name]):
                if failing:
                    continue
                raise ValueError(f"record_routing: expert-choice MoE layer {name!r} ran {len(chunks)} forwards inside "
                                 "one record_routing context; its routes (each expert's picked tokens, (E, C)) "
                                 "belong to one forward: record each forward in its own context")
            if chunks:
                routes[name] = torch.cat(chunks) if len(chunks) > 1 else chunks[0]


def check_routes(routes: Mapping[str, Tensor], layers: Mapping[str, object]) -> None:
    """Every name a layer of the model, every value an int64 `(S, k)` tensor of valid expert ids."""
    if not isinstance(routes, Mapping):
        raise TypeError(f"routes must be a {{layer name: LongTensor (S, k)}} dict, got {type(routes).__name__}")
    unknown = sorted(set(routes) - set(layers))
    if unknown:
        raise ValueError(f"replay_routing: routes name {unknown}, which are not MoE layers of the model; its layers "
                         f"are {sorted(layers)}")
    for name, ids in routes.items():
        layer = layers[name]
        k, E = layer.gate.config.k, layer.gate.config.num_experts
        if _expert_choice(layer):
            _check_picks(name, ids, E)
            continue
        if not isinstance(ids, Tensor) or ids.dtype != torch.int64:
            got = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
            raise TypeError(f"replay_routing: routes[{name!r}] must be a LongTensor (int64) of shape (S, {k}), got {got}")
        if ids.dim() != 2 or ids.shape[1] != k:
            raise ValueError(f"replay_routing: routes[{name!r}] has shape {tuple(ids.shape)}; layer {name!r} routes "
                             f"each token to k={k} experts, so it must be (S, {k})")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= E):
            raise ValueError(f"replay_routing: routes[{name!r}] holds expert ids in [{int(ids.min())}, "
                             f"{int(ids.max())}]; layer {name!r} has experts 0..{E - 1}")
        ordered = ids.sort(dim=1).values
        if ids.shape[0] and bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError(f"replay_routing: routes[{name!r}] sends a token to the same expert twice; a token's "
                             f"{k} experts must differ")


def _check_picks(name: str, picks, E: int) -> None:
    """An expert-choice layer's routes: int64 `(E, C)`, token ids >= 0, no expert picking a token twice
    (token ids beyond the batch are caught at the forward, where the token count is known)."""
    if not isinstance(picks, Tensor) or picks.dtype != torch.int64:
        got = picks.dtype if isinstance(picks, Tensor) else type(picks).__name__
        raise TypeError(f"replay_routing: routes[{name!r}] must be a LongTensor (int64) of shape ({E}, C), got {got}")
    if picks.dim() != 2 or picks.shape[0] != E:
        raise ValueError(f"replay_routing: routes[{name!r}] has shape {tuple(picks.shape)}; layer {name!r} routes "
                         f"by expert choice over {E} experts, so it must be ({E}, C): each expert's picked tokens")
    if picks.numel() and int(picks.min()) < 0:
        raise ValueError(f"replay_routing: routes[{name!r}] holds token id {int(picks.min())}; token ids are >= 0")
    if picks.shape[1] > 1 and bool((picks.sort(dim=1).values[:, 1:] == picks.sort(dim=1).values[:, :-1]).any()):
        raise ValueError(f"replay_routing: routes[{name!r}] has an expert pick one token twice; an expert's C "
                         "tokens must differ")


@contextlib.contextmanager
def replay_routing(model: nn.Module, routes: Mapping[str, Tensor]):
    """Make the forwards run inside route every token to ``routes``' experts (see module docstring).

    Layers not named in ``routes`` route as usual. At each forward, a layer whose token count differs
    from its routes' ``S`` raises a ValueError naming the layer and both shapes. Routes belong to one
    batch: the first call of ``model`` inside the context pins its data inputs (the tensors without
    autograd history: token ids, masks, features), and a later call with other data (another batch
    of the same size, e.g. after an optimizer step) raises a ValueError. Forwards of the same batch,
    before and after optimizer steps, are what the context is for.
    """
    layers = _layers(model, "replay_routing")
    check_routes(routes, layers)
    guard = model.register_forward_pre_hook(_BatchGuard(type(model).__name__), with_kwargs=True)
    for name, ids in routes.items():
        layers[name]._replay_ids = ids
    try:
        yield
    finally:
        guard.remove()
        for name in routes:
            layers[name]._replay_ids = None


def _data_tensors(args, kwargs) -> List[Tuple[str, Tensor]]:
    """``(where, tensor)`` of the forward's inputs that are data: no autograd history, no gradient."""
    out: List[Tuple[str, Tensor]] = []

    def walk(where, value, depth=0):
        if isinstance(value, Tensor):
            if value.grad_fn is None and not value.requires_grad:
                out.append((where, value))
        elif depth < 3 and isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{where}[{i}]", v, depth + 1)
        elif depth < 3 and isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{where}[{k!r}]", v, depth + 1)

    for i, a in enumerate(args):
        walk(f"argument {i}", a)
    for k, v in kwargs.items():
        walk(k, v)
    return out


class _BatchGuard:
    """A forward pre-hook on the replayed model: routes belong to one batch.

    The first forward inside a ``replay_routing`` context pins its data inputs (token ids, masks,
    input features: the tensors without autograd history); a later forward inside the same
    context whose data differ (another batch with the same token count, typically after an
    optimizer step) is an error, not a silent replay of one batch's routes on another's tokens.
    """

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.pinned: Optional[List[Tuple[str, Tensor]]] = None

    def __call__(self, module, args, kwargs):
        data = _data_tensors(args, kwargs)
        if self.pinned is None:
            self.pinned = [(w, t.detach().clone()) for w, t in data]
            return None
        old = dict(self.pinned)
        for where, t in data:
            ref = old.get(where)
            if ref is None or ref.shape != t.shape or ref.dtype != t.dtype or ref.device != t.device or \
                    not torch.equal(ref, t):
                raise ValueError(
                    f"replay_routing: the batch changed inside one replay_routing context: {self.model_name}'s "
                    f"input {where!r} (shape {tuple(t.shape)}) differs from the batch the routes were first "
                    f"replayed on ({'absent' if ref is None else 'shape ' + str(tuple(ref.shape))}). Routes "
                    "belong to one batch's tokens, also across optimizer steps: replay each batch in its own "
                    "replay_routing(model, routes_of_that_batch) context")
        if len(data) != len(self.pinned):
            raise ValueError(
                f"replay_routing: the batch changed inside one replay_routing context: {self.model_name} got "
                f"data inputs {[w for w, _ in data]} but the routes were first replayed with "
                f"{[w for w, _ in self.pinned]}; replay each batch in its own replay_routing context")
        return None


__all__ = ["Routes", "record_routing", "replay_routing", "check_routes"]

