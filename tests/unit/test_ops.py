"""Row-moving kernels of moesaic.layer.ops: reading row blocks in place, gathers and the weighted combine."""

import torch

from moesaic.layer.ops import gather_pieces, rows_in_place, weighted_combine


def test_rows_in_place_finds_consecutive_blocks_of_one_tensor():
    base = torch.randn(10, 4)
    pieces = base.split([3, 0, 5, 2])
    whole = rows_in_place(pieces)
    assert whole is not None and whole.data_ptr() == base.data_ptr() and torch.equal(whole, base)
    assert torch.equal(rows_in_place(base[2:9].split([4, 3])), base[2:9])


def test_rows_in_place_refuses_anything_else():
    base = torch.randn(10, 4)
    a, b, c = base.split([3, 3, 4])
    assert rows_in_place([a, c]) is None  # a gap
    assert rows_in_place([b, a]) is None  # out of order
    assert rows_in_place([a, torch.randn(3, 4)]) is None  # another tensor
    assert rows_in_place(list(base.t().contiguous().t().split([3, 7]))) is None  # column-major
    assert rows_in_place([base[:, :2], base[:, 2:]]) is None  # column blocks
    assert rows_in_place([torch.empty(0, 4), torch.empty(0, 4)]) is None  # nothing
    assert rows_in_place([a.to(torch.float64)]) is not None  # one piece is its own block


def _combine(ys, weight, token, S, D):
    w = weight.clone().requires_grad_()
    out = weighted_combine(ys, w, token, S)
    g = torch.arange(S * D, dtype=torch.float32).view(S, D)
    grad_w, *grad_ys = torch.autograd.grad(out, [w, *ys], g)
    return out, grad_w, torch.cat(grad_ys)


def test_combine_reads_row_blocks_as_it_reads_separate_pieces():
    torch.manual_seed(0)
    S, D, sizes = 6, 4, [3, 0, 5]
    token = torch.tensor([0, 3, 5, 1, 3, 2, 0, 4])
    weight = torch.rand(8)
    base = torch.randn(8, D)
    blocks = list(base.clone().requires_grad_().split(sizes))  # row blocks of one tensor
    separate = [p.clone().requires_grad_() for p in base.split(sizes)]
    for a, b in zip(_combine(blocks, weight, token, S, D), _combine(separate, weight, token, S, D)):
        assert torch.equal(a, b)


def test_gather_backward_reads_row_blocks_as_it_reads_separate_pieces():
    torch.manual_seed(0)
    S, D, sizes = 6, 4, [3, 0, 5]
    token = torch.tensor([0, 3, 5, 1, 3, 2, 0, 4])
    x = torch.randn(S, D, requires_grad=True)
    pieces = gather_pieces(x, token, sizes)
    assert torch.equal(torch.cat(pieces), x.detach()[token])
    grads = torch.randn(8, D)
    (from_blocks,) = torch.autograd.grad(pieces, x, list(grads.split(sizes)), retain_graph=True)
    (from_separate,) = torch.autograd.grad(pieces, x, [g.clone() for g in grads.split(sizes)])
    assert torch.equal(from_blocks, from_separate)
    assert torch.equal(from_blocks, torch.zeros(S, D).index_add_(0, token, grads))


def test_saved_pieces_rebuild_all_hands_out_each_piece_once():
    # stacked experts unpack all their saved input pieces at once: one rebuild of all of them, each
    # piece handed out once (then held only by its consumer); a second backward starts over
    from moesaic.layer.ops import SavedPieces

    x = torch.randn(7, 3)
    pieces = [x[:2].clone(), x[2:2].clone(), x[2:].clone()]
    calls = {"one": 0, "all": 0}

    def one(i):
        calls["one"] += 1
        return [x[:2], x[2:2], x[2:]][i].clone()

    def all_():
        calls["all"] += 1
        return x.clone().split([2, 0, 5])

    w = torch.randn(3, 3, requires_grad=True)
    with SavedPieces(pieces, one, all_):
        outs = [p @ w for p in pieces]  # mm saves each piece for w's gradient
    (sum(o.sum() for o in outs)).backward(retain_graph=True)
    assert calls == {"one": 0, "all": 1}
    torch.testing.assert_close(w.grad, x.t() @ torch.ones(7, 3))
    w.grad = None
    outs[0].sum().backward()  # the retained graph asks for piece 0 again
    assert calls == {"one": 0, "all": 2}
    torch.testing.assert_close(w.grad, x[:2].t() @ torch.ones(2, 3))


def test_saved_pieces_never_keep_a_base_alive_through_an_empty_view():
    # an expert without rows gets a (0, D) row block of the one gathered tensor; saved as it is,
    # it held the whole gather (N x D) until backward: +40 MiB forward memory on an 8-layer model
    from moesaic.layer.ops import SavedPieces

    base = torch.randn(6, 4)
    pieces = list(base.split([3, 0, 3]))
    saved = SavedPieces(pieces, lambda i: pieces[i].clone())
    packed = saved._pack(pieces[1])
    assert packed.shape == (0, 4) and packed.untyped_storage().nbytes() == 0
    assert saved._unpack(packed).shape == (0, 4)
