"""Row-moving kernels the dispatchers share: gather tokens into expert pieces, weighted combine back.

``gather_pieces`` gathers each kept route's token into expert order, one piece per expert;
``weighted_combine`` multiplies each expert output by its route weight and scatter-adds it back
onto its token. Memory is O(routes x D): no one-hot ``[S, E, C]`` tensor and no padded
``[E, C, D]`` buffer, so experts only ever compute on rows that hold a token.
:class:`SavedPieces` keeps the experts' saved inputs as indices instead of copies.

Both row movers are small autograd Functions (private to this module; use the functions):

* gathers use ``F.embedding`` (a row gather several times faster than ``index_select`` on CPU
  for unsorted indices) and their backward is one ``index_add_``;
* ``combine`` works in row chunks, so neither its forward nor its backward materialises the
  ``(N, D)`` weighted products that ``y * w`` followed by ``index_add`` would (extra ``(N, D)``
  tensors at the layer's memory peak).

Shape legend: S = tokens, N = kept routes, D = model dim.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

_CHUNK_ROWS = 4096  # rows per step in combine: full-speed kernels, small temporaries
_FEW_PIECES = 16    # up to this many pieces (or pieces of >= 1024 rows on average) are handled one by one


def _few_large(sizes: Sequence[int]) -> bool:
    """Whether per-piece kernels beat concatenating: few pieces, or large ones."""
    return len(sizes) <= _FEW_PIECES or sum(sizes) >= 1024 * len(sizes)


def rows_in_place(pieces: Sequence[Tensor]) -> Optional[Tensor]:
    """The `(N, D)` tensor the 2-D ``pieces`` are consecutive row blocks of, without a copy; else None.

    Stacked experts write their per-expert outputs (and input gradients) as row blocks of one
    buffer; reading the buffer whole saves the `(N, D)` concatenation ``torch.cat`` would make.
    Pieces with no rows are ignored (they hold nothing and may live anywhere).
    """
    full = [p for p in pieces if p.numel()]
    if not full:
        return None
    first = full[0]
    if first.dim() != 2 or not first.is_contiguous():
        return None
    width, step = first.shape[1], first.element_size()
    end = first.data_ptr()
    storage = first.untyped_storage().data_ptr()
    for p in full:
        if (p.dim() != 2 or p.shape[1] != width or p.dtype != first.dtype or p.device != first.device
                or not p.is_contiguous() or p.data_ptr() != end or p.untyped_storage().data_ptr() != storage):
            return None
        end += p.numel() * step
    rows = sum(p.shape[0] for p in full)
    return first.as_strided((rows, width), (width, 1))


def row_blocks(y_ND: Tensor, sizes: Sequence[int]) -> List[Tensor]:
    """The consecutive row blocks of ``y_ND`` (``sizes[i]`` rows each) as tensors over its memory, not views.

    Each block is a tensor of its own over ``y_ND``'s storage (no copy), not an autograd view of it:
    FSDP2 warns for a module's outputs that are views (an in-place op on a view would drop its
    pre-backward hook), and the stacked experts' outputs are row blocks of one buffer. The blocks
    cover disjoint rows, so an in-place op on one changes no other; :func:`rows_in_place` still reads
    them back as one tensor without a copy. Call it outside autograd (inside a Function's forward)
    or through :func:`split_rows`.
    """
    if y_ND.dim() != 2:
        raise ValueError(f"row_blocks expects a 2-D tensor, got shape {tuple(y_ND.shape)}")
    if sum(sizes) != y_ND.shape[0]:
        raise ValueError(f"row_blocks: sizes {list(sizes)} sum to {sum(sizes)}, not the {y_ND.shape[0]} rows")
    y_ND = y_ND.contiguous()
    storage, width, at = y_ND.untyped_storage(), y_ND.shape[1], y_ND.storage_offset()
    out = []
    for n in sizes:
        out.append(y_ND.new_empty(0).set_(storage, at, (n, width), (width, 1)))
        at += n * width
    return out


class _SplitRows(torch.autograd.Function):
    """:func:`row_blocks` under autograd; backward reads the blocks' gradients as one tensor."""

    @staticmethod
    def forward(ctx, y_ND: Tensor, sizes: Sequence[int]) -> Tuple[Tensor, ...]:
        ctx.sizes = list(sizes)
        return tuple(row_blocks(y_ND.detach(), sizes))

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        ref = next(g for g in grads if g is not None)
        grads = [g if g is not None else ref.new_zeros(n, ref.shape[1]) for g, n in zip(grads, ctx.sizes)]
        whole = rows_in_place(grads)
        return (whole if whole is not None and whole.shape[0] == sum(ctx.sizes) else torch.cat(grads)), None


def split_rows(y_ND: Tensor, sizes: Sequence[int]) -> List[Tensor]:
    """``list(y_ND.split(sizes))`` whose blocks are not autograd views of ``y_ND`` (see :func:`row_blocks`)."""
    return list(_SplitRows.apply(y_ND, list(sizes)))


def gather_rows(x_SD: Tensor, index_N: Tensor) -> Tensor:
    """``x_SD[index_N]`` without autograd (a fast row gather)."""
    if x_SD.dim() != 2:
        raise ValueError(f"gather_rows expects a 2-D tensor, got shape {tuple(x_SD.shape)}")
    return F.embedding(index_N, x_SD)


class _Permute(torch.autograd.Function):
    """Piece i = x[index[rows of piece i]]; backward scatter-adds each piece's gradient back.

    Returning one tensor per expert (rather than one tensor the experts then split) means the
    backward never concatenates the experts' input gradients into an `(N, D)` copy.
    """

    @staticmethod
    def forward(ctx, x_SD: Tensor, index_N: Tensor, sizes: Sequence[int], as_views: bool = False) -> Tuple[Tensor, ...]:
        ctx.save_for_backward(index_N)
        ctx.num_rows = x_SD.shape[0]
        ctx.sizes = list(sizes)
        if as_views:  # one gather; the pieces are its row blocks (views: not to be modified in place)
            return tuple(gather_rows(x_SD.detach(), index_N).split(ctx.sizes))
        # separate tensors: an expert may modify its input in place
        return tuple(gather_rows(x_SD.detach(), piece) for piece in index_N.split(ctx.sizes))

    @staticmethod
    def backward(ctx, *grads: Tensor):
        (index_N,) = ctx.saved_tensors
        width = next((g.shape[1] for g in grads if g is not None and g.dim() == 2), None)
        if width is None:
            return None, None, None
        ref = next(g for g in grads if g is not None and g.dim() == 2)
        grad_SD = ref.new_zeros(ctx.num_rows, width)
        pairs = [(idx, g) for idx, g in zip(index_N.split(ctx.sizes), grads) if g is not None and idx.numel()]
        whole = rows_in_place([g for _, g in pairs]) if len(pairs) > 1 else None
        if whole is not None:  # the gradients are row blocks of one tensor (stacked experts): one kernel, no copy
            full = len(pairs) == sum(1 for n in ctx.sizes if n)
            grad_SD.index_add_(0, index_N if full else torch.cat([idx for idx, _ in pairs]), whole)
        elif _few_large(ctx.sizes):
            for idx, g in pairs:
                grad_SD.index_add_(0, idx, g)
        elif pairs:  # many small pieces: one copy beats many kernel launches
            grad_SD.index_add_(0, torch.cat([idx for idx, _ in pairs]), torch.cat([g for _, g in pairs]))
        return grad_SD, None, None, None


def gather_pieces(x_SD: Tensor, index_N: Tensor, sizes: Sequence[int], as_views: bool = False) -> Tuple[Tensor, ...]:
    """Rows ``x_SD[index_N]`` split into one `(N_i, D)` piece per entry of ``sizes`` (differentiable).

    The backward scatter-adds each piece's gradient onto the rows it came from. ``as_views``: the
    pieces are row blocks of one gathered tensor (one kernel, one allocation), for consumers that
    never modify them in place; else each piece is its own tensor.
    """
    if sum(sizes) != index_N.numel():
        raise ValueError(f"sizes add up to {sum(sizes)} but index_N holds {index_N.numel()} rows")
    return _Permute.apply(x_SD, index_N, list(sizes), bool(as_views))


class _WeightedScatterAdd(torch.autograd.Function):
    """out[token[n]] += w[n] * y[n] over the experts' output pieces; fp32 accumulation.

    Work runs in row chunks. Many small pieces (many experts, few tokens each) are concatenated
    first, so such a layer costs a few kernel launches rather than a few per expert; a few large
    pieces are read where they are, saving the copy.
    """

    @staticmethod
    def forward(ctx, weight_N: Tensor, token_N: Tensor, num_tokens: int, *ys: Tensor) -> Tensor:
        sizes = [y.shape[0] for y in ys]
        # many small pieces are concatenated once (the pieces are then free); few large ones are read
        # in place, saving the copy
        whole = rows_in_place(ys) if len(ys) > 1 else None
        if whole is not None:  # row blocks of one tensor (stacked experts): read it whole
            pieces = [whole]
        else:
            pieces = list(ys) if _few_large(sizes) or len(ys) == 1 else [torch.cat(ys)]
        dtype = ys[0].dtype
        out_SD = torch.zeros(num_tokens, ys[0].shape[1], dtype=torch.promote_types(dtype, weight_N.dtype),
                             device=weight_N.device)
        offset = 0
        for y in pieces:
            for start in range(0, y.shape[0], _CHUNK_ROWS):
                n = min(_CHUNK_ROWS, y.shape[0] - start)
                rows = slice(offset + start, offset + start + n)
                out_SD.index_add_(0, token_N[rows], y[start:start + n] * weight_N[rows, None])
            offset += y.shape[0]
        ctx.save_for_backward(weight_N, token_N, *pieces)
        ctx.sizes = sizes
        ctx.piece_rows = [y.shape[0] for y in pieces]
        return out_SD.to(dtype)

    @staticmethod
    def backward(ctx, grad_SD: Tensor):
        weight_N, token_N, *pieces = ctx.saved_tensors
        need_w = ctx.needs_input_grad[0]
        need_y = any(ctx.needs_input_grad[3:])
        grad_w_N = torch.empty_like(weight_N) if need_w else None
        grads_y: List = [None] * len(ctx.sizes)
        if need_w or need_y:
            grad_routes_ND = gather_rows(grad_SD.contiguous(), token_N)  # becomes grad_y in place
            offset = 0
            for y in pieces:
                for start in range(0, y.shape[0], _CHUNK_ROWS):
                    n = min(_CHUNK_ROWS, y.shape[0] - start)
                    rows = slice(offset + start, offset + start + n)
                    g = grad_routes_ND[rows]
                    w = weight_N[rows, None]
                    if need_w:
                        grad_w_N[rows] = torch.linalg.vecdot(g.to(weight_N.dtype), y[start:start + n].to(weight_N.dtype))
                    if need_y:
                        if g.dtype == weight_N.dtype:
                            g.mul_(w)
                        else:  # scale in fp32 as the forward did, then round once
                            g.copy_(g.to(weight_N.dtype) * w)
                offset += y.shape[0]
            if need_y:
                grads_y = list(grad_routes_ND.split(ctx.sizes))
        return (grad_w_N, None, None, *grads_y)


def weighted_combine(ys: Sequence[Tensor], weight_N: Tensor, token_N: Tensor, num_tokens: int) -> Tensor:
    """Weighted scatter-add of expert outputs back onto their tokens: ``out[token_N[n]] += weight_N[n] * y[n]``.

    The products and the sum over a token's routes are formed in fp32 (the router weights'
    dtype), as DeepSpeed's decode does, then cast back to the experts' dtype. Tokens whose every
    route was dropped come out as zeros.

    Args:
        ys: the experts' outputs, `(N_i, D)` pieces whose rows, concatenated, line up with
            ``weight_N`` and ``token_N`` (or one `(N, D)` tensor).
        weight_N: `(N,)` fp32 route weights (differentiable).
        token_N: `(N,)` int64 token of each route.
        num_tokens: S.

    Returns:
        `(S, D)` combined output in the experts' dtype.
    """
    if isinstance(ys, Tensor):
        ys = [ys]
    total = sum(y.shape[0] for y in ys)
    if total != token_N.numel() or weight_N.shape != token_N.shape:
        raise ValueError(f"expert outputs hold {total} rows but there are {token_N.numel()} routes "
                         f"({weight_N.numel()} weights)")
    return _WeightedScatterAdd.apply(weight_N, token_N, num_tokens, *ys)


class HandedPieces(list):
    """The experts' input pieces as a dispatcher returns them: a list handed over with the pieces.

    ``MOELayer`` passes the list to its experts and keeps no other reference to the pieces, so
    experts that are done with their inputs before their forward ends may empty it
    (``handed.clear()``), and the dispatched `(N, D)` rows are freed before the rest of the
    experts' forward allocates (stacked experts: after the input projections, before the output
    projection's `(N, D)` output). Saved for backward they are kept by autograd (or rebuilt by
    :class:`SavedPieces`) as before. Any other list of pieces is left as it is.
    """


class SavedPieces:
    """Context manager: experts that save their input piece for backward keep a recipe instead.

    An expert's first layer saves its input (its gathered `(N_i, D)` piece) for its weight
    gradient. Where the rows the piece was gathered from stay alive anyway (the layer input,
    which the router saves), that copy is redundant, and a row gather is cheap next to an
    expert's matmuls. Inside this context a saved tensor that *is* one of the pieces (same
    storage, shape and strides, never modified in place) is packed as its piece number and rebuilt
    by ``rebuild(i, *sources)`` when backward needs it, which takes one `(N, D)` tensor off the
    layer's memory peak.

    **Under other saved-tensor hooks** (activation checkpointing, which drops every saved tensor
    and recomputes it in backward; offloading): with ``sources`` given, the context nests over
    them. Every saved tensor that is not a piece goes to those hooks as it would have; a piece is
    kept as its number plus the ``sources``, which go to the outer hooks once per context (a
    checkpoint drops them in forward and its recompute keeps them, sharing the storage of tensors
    the recompute keeps anyway). So a recompute holds the layer input and an index instead of the
    `(N, D)` pieces, and the pieces are rebuilt when the experts' backward asks for them. Both the
    first forward and its recompute pass the same tensors to the outer hooks in the same order
    (what a checkpoint checks). Without ``sources`` the context steps aside under other hooks
    (they then see the pieces).

    Args:
        pieces: the experts' input pieces.
        rebuild: ``rebuild(i, *sources)`` returns a tensor equal to ``pieces[i]`` (without
            autograd). It must read no tensor but ``sources`` (a closure over the layer input
            would keep it alive where a checkpoint dropped it).
        rebuild_all: optional; ``rebuild_all(*sources)`` returns every piece at once (one gather
            instead of one per piece). Given, the first unpack rebuilds all pieces and hands each
            out when asked; suits experts that unpack all their inputs together (stacked
            experts' one backward).
        sources: the tensors the rebuild reads (e.g. the layer input and the routes' token
            indices); None: the rebuild functions take only ``i``, and the context steps aside
            under other saved-tensor hooks.
    """

    def __init__(self, pieces: Sequence[Tensor], rebuild: Callable[..., Tensor],
                 rebuild_all: Optional[Callable[..., Sequence[Tensor]]] = None,
                 sources: Optional[Sequence[Tensor]] = None) -> None:
        self._rebuild = rebuild
        self._rebuild_all = rebuild_all
        self._rebuilt: Optional[List[Optional[Tensor]]] = None
        self._nestable = sources is not None
        self._sources: Optional[Tuple[Tensor, ...]] = tuple(sources) if sources is not None else ()
        # under outer hooks: the sources as the outer hooks packed them, and unpacked (while needed)
        self._outer: Optional[Tuple[Callable, Callable]] = None
        self._packed_sources: Optional[Tuple] = None
        self._unpacked_sources: Optional[Tuple[Tensor, ...]] = None
        self._refs = self._handed = 0  # pieces packed / handed out in this backward (under outer hooks)
        # a piece is matched by storage, shape and strides, and must not have been modified since
        self._keys = {_key(p): (i, p._version) for i, p in enumerate(pieces) if p.numel()}
        self._device = pieces[0].device if len(pieces) else None
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: Tensor):
        if t.numel() == 0:
            # an empty view (an expert without rows) still holds its base's storage: a piece cut
            # from one gathered tensor would keep the whole gather alive until backward
            return t.new_empty(t.shape) if t._base is not None else t
        if t.device == self._device:
            found = self._keys.get(_key(t))
            if found is not None and found[1] == t._version:
                if self._outer is not None:
                    if self._packed_sources is None:
                        self._packed_sources = tuple(self._outer[0](s) for s in self._sources)
                        self._sources = None  # from now on only the outer hooks hold them
                    self._refs += 1
                return _PieceRef(found[0])
        return t if self._outer is None else _OuterPacked(self._outer[0](t))

    def _sources_now(self) -> Tuple[Tensor, ...]:
        if self._outer is None:
            return self._sources
        if self._unpacked_sources is None:
            self._unpacked_sources = tuple(self._outer[1](p) for p in self._packed_sources)
        return self._unpacked_sources

    def _unpack(self, packed):
        if isinstance(packed, _OuterPacked):
            return self._outer[1](packed.packed)
        if not isinstance(packed, _PieceRef):
            return packed
        if self._rebuild_all is None:
            piece = self._rebuild(packed.i, *self._sources_now())
            if self._outer is not None:
                # the unpacked sources are kept until every piece of this backward was handed out
                self._handed += 1
                if self._handed == self._refs:
                    self._handed, self._unpacked_sources = 0, None
            return piece
        # every piece at once (one gather), handed out one by one; each is then held only by
        # the backward that asked for it
        if self._rebuilt is None:
            packed_ids = {i for i, _ in self._keys.values()}
            self._rebuilt = [p if i in packed_ids else None
                             for i, p in enumerate(self._rebuild_all(*self._sources_now()))]
            self._unpacked_sources = None
        piece = self._rebuilt[packed.i]
        if piece is None:  # asked for twice (a retained graph): rebuild it alone
            piece = self._rebuild(packed.i, *self._sources_now())
            self._unpacked_sources = None
            return piece
        self._rebuilt[packed.i] = None
        if all(p is None for p in self._rebuilt):
            self._rebuilt = None  # a second backward (retain_graph) starts over
        return piece

    def __enter__(self):
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if outer is not None:
            if not self._nestable:
                # other saved-tensor hooks are active (activation checkpointing, which drops every
                # saved tensor and recomputes it, or offloading) and the rebuild cannot go through
                # them: they own the experts' saved tensors. Taking over would keep the experts'
                # activations of a checkpointed region alive.
                self._hooks = None
                return self
            self._outer = outer
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        # drop the hooks object: it holds this object's bound methods, a reference cycle that
        # kept every layer's input and routing alive until Python's cyclic collector ran
        hooks, self._hooks = self._hooks, None
        if self._outer is not None and self._packed_sources is None:
            self._sources = None  # no piece was saved: nothing to rebuild, hold nothing
        return hooks.__exit__(*exc) if hooks is not None else False


def _key(t: Tensor):
    return t.data_ptr(), tuple(t.shape), t.stride()


class _OuterPacked:
    """A saved tensor as the outer saved-tensor hooks packed it (SavedPieces nested over them)."""

    __slots__ = ("packed",)

    def __init__(self, packed) -> None:
        self.packed = packed


class _PieceRef:
    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i
