"""The dispatcher interface, and the dispatcher for a layer whose experts are all on this process.

A dispatcher moves tokens between the router's decision and the experts, and brings the outputs
back. It has three methods, and ``MOELayer.forward`` calls exactly these, whatever the
parallelism::

    pieces, meta = dispatcher.dispatch(x_SD, routing)   # one input piece per local expert
    with dispatcher.saved_inputs(pieces, meta):         # experts' saved inputs kept as indices
        outputs = experts(pieces)                       # experts only compute
    y_SD = dispatcher.combine(outputs, meta)            # weighted sum back onto the tokens

``meta`` is whatever the dispatcher needs to bring the outputs home (a frozen dataclass);
nothing else reads it. A new dispatcher (a different transport, a different layout) implements
:class:`Dispatcher` and is installed with ``MOELayer.set_dispatcher``; routers and experts do not
change. ``MixtureOfExperts.set_expert_parallel_groups`` picks the one for a layer's process groups.

Shape legend: S = tokens, N = kept routes, D = model dim.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ContextManager, List, Sequence, Tuple

from torch import Tensor

from .._checks import check_int
from .ops import HandedPieces, SavedPieces, gather_pieces, gather_rows, weighted_combine
from .routing import Routing


class Dispatcher(ABC):
    """Moves routed tokens to this rank's experts and their outputs back (see module docstring)."""

    #: experts held by this rank, i.e. pieces ``dispatch`` returns
    num_local_experts: int

    @abstractmethod
    def dispatch(self, x_SD: Tensor, routing: Routing, together: bool = False) -> Tuple[List[Tensor], Any]:
        """Returns one `(N_l, D)` input piece per local expert (in local order) and the metadata.

        ``together``: the experts take all pieces as one batch and never modify them in place
        (stacked experts), so the pieces may be row blocks of one tensor.
        """

    @abstractmethod
    def combine(self, outputs: Sequence[Tensor], meta: Any) -> Tensor:
        """The experts' outputs (one per piece) weighted and summed back onto the `(S, D)` tokens."""

    def saved_inputs(self, pieces: Sequence[Tensor], meta: Any, together: bool = False) -> ContextManager:
        """A context for the experts' forward that stores their saved inputs cheaply (default: as they are).

        ``together``: the experts' backward asks for all its saved pieces at once (stacked experts),
        so a dispatcher may rebuild them in one go.
        """
        return contextlib.nullcontext()


@dataclass(frozen=True)
class LocalMeta:
    """What :class:`LocalDispatcher` needs to combine: the routing, the input, the piece sizes."""

    routing: Routing
    x_SD: Tensor
    sizes: Tuple[int, ...]


class LocalDispatcher(Dispatcher):
    """All experts on this process: gather tokens into expert order, scatter-add outputs back.

    Args:
        num_experts: E, the experts of the layer (all local).
    """

    def __init__(self, num_experts: int) -> None:
        check_int(num_experts, "num_experts", 1)
        self.num_local_experts = num_experts

    def dispatch(self, x_SD: Tensor, routing: Routing, together: bool = False) -> Tuple[List[Tensor], LocalMeta]:
        if routing.tokens_per_expert_E.numel() != self.num_local_experts:
            raise ValueError(f"routing is over {routing.tokens_per_expert_E.numel()} experts but this dispatcher "
                             f"holds {self.num_local_experts}")
        sizes = tuple(routing.tokens_per_expert_E.tolist())
        pieces = gather_pieces(x_SD, routing.token_idx_N, sizes, as_views=together)
        return HandedPieces(pieces), LocalMeta(routing, x_SD.detach(), sizes)

    def saved_inputs(self, pieces: Sequence[Tensor], meta: LocalMeta, together: bool = False) -> ContextManager:
        # the layer input stays alive (the router saved it): re-gather a piece instead of keeping it
        # (all pieces in one gather when the experts' backward wants them together). The rebuilds
        # read only their sources: under a checkpoint those go through its hooks (ops.SavedPieces)
        sizes = list(meta.sizes)

        def rebuild(i: int, x_SD: Tensor, index_N: Tensor) -> Tensor:
            return gather_rows(x_SD, index_N.split(sizes)[i])

        def rebuild_all(x_SD: Tensor, index_N: Tensor) -> Sequence[Tensor]:
            return gather_rows(x_SD, index_N).split(sizes)

        return SavedPieces(pieces, rebuild, rebuild_all if together else None,
                           sources=(meta.x_SD, meta.routing.token_idx_N))

    def combine(self, outputs: Sequence[Tensor], meta: LocalMeta) -> Tensor:
        r = meta.routing
        return weighted_combine(outputs, r.weight_N, r.token_idx_N, meta.x_SD.shape[0])

    def __repr__(self) -> str:
        return f"LocalDispatcher(num_experts={self.num_local_experts})"

