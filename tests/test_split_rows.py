"""Few-row products spread over the threads (smoe.dispatch.split_rows) equal the plain product,
fall back where they cannot split, and the gather engine's decode loop that uses them still
equals the reference engine with several threads."""

from __future__ import annotations

import pytest
import torch

from smoe.dispatch import split_rows
from smoe.dispatch.gather import gather_dispatch
from smoe.dispatch.reference import reference_dispatch


@pytest.fixture
def threads(request, monkeypatch):
    """The intra-op thread count, and no minimum weight size: the tests' weights are small."""
    monkeypatch.setattr(split_rows, "SPLIT_MIN_WEIGHT", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("rows", [1, 3, split_rows.SPLIT_MAX_ROWS, split_rows.SPLIT_MAX_ROWS + 1])
@pytest.mark.parametrize("n_out", [48, 50])  # 50: not divisible by 3, so 3 threads fall back
def test_split_products_equal_the_plain_product(threads, rows, n_out):
    g = torch.Generator().manual_seed(rows * 100 + n_out)
    x_NK = torch.randn(rows, 40, generator=g)
    w_MK = torch.randn(n_out, 40, generator=g)
    w_KM = torch.randn(40, n_out, generator=g)
    torch.testing.assert_close(split_rows.rows_times_wt(x_NK, w_MK), x_NK @ w_MK.t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split_rows.rows_times_w(x_NK, w_KM), x_NK @ w_KM, atol=1e-5, rtol=1e-5)
    # Non-contiguous weights (a transposed view) take the plain product and agree too.
    torch.testing.assert_close(split_rows.rows_times_wt(x_NK, w_KM.t()), x_NK @ w_KM, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split_rows.rows_times_w(x_NK, w_MK.t()), x_NK @ w_MK.t(), atol=1e-5, rtol=1e-5)
    # Into a given output (a row slice of a bigger tensor, as the engines pass it).
    big = torch.full((rows + 2, n_out), float("nan"))
    assert split_rows.rows_times_wt(x_NK, w_MK, out=big[1 : rows + 1]) is not None
    torch.testing.assert_close(big[1 : rows + 1], x_NK @ w_MK.t(), atol=1e-5, rtol=1e-5)
    assert big[0].isnan().all() and big[-1].isnan().all()
    split_rows.rows_times_w(x_NK, w_KM, out=big[1 : rows + 1])
    torch.testing.assert_close(big[1 : rows + 1], x_NK @ w_KM, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_split_blocks_follow_the_rules(threads):
    x = torch.randn(2, 8)
    assert split_rows.blocks(x, 48) == 2
    assert split_rows.blocks(x, 49) == 1  # not divisible
    assert split_rows.blocks(x.bfloat16(), 48) == 1  # float32 only
    assert split_rows.blocks(torch.randn(split_rows.SPLIT_MAX_ROWS + 1, 8), 48) == 1
    split_rows.SPLIT_MIN_WEIGHT = 8 * 48 + 1  # the fixture's monkeypatch restores it
    assert split_rows.blocks(x, 48) == 1
    split_rows.SPLIT_MIN_WEIGHT = 8 * 48
    assert split_rows.blocks(x, 48) == 2
    torch.set_num_threads(1)
    assert split_rows.blocks(x, 48) == 1


@pytest.mark.parametrize("threads", [2, 3], indirect=True)
@pytest.mark.parametrize(
    "ids", [[[0, 3]], [[2, 1], [2, 0]], [[1, 4]]], ids=["1-token", "shared-expert", "dropped"]
)
def test_gather_decode_on_several_threads_equals_reference(threads, ids):
    """T * K <= E without autograd: the gather engine's decode loop, products split in blocks
    (F = 48 and D = 24 divide by 2 and 3). Id 4 = E marks a dropped assignment."""
    g = torch.Generator().manual_seed(7)
    E, D, F_ = 4, 24, 48
    ids_TK = torch.tensor(ids)
    x_TD = torch.randn(ids_TK.shape[0], D, generator=g)
    w_TK = torch.softmax(torch.randn(ids_TK.shape, generator=g), -1)
    w1, w3 = torch.randn(E, F_, D, generator=g), torch.randn(E, F_, D, generator=g)
    w2 = torch.randn(E, D, F_, generator=g)
    with torch.no_grad():
        got = gather_dispatch(x_TD, ids_TK, w_TK, w1, w2, w3)
    torch.testing.assert_close(got, reference_dispatch(x_TD, ids_TK, w_TK, w1, w2, w3), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("threads", [2, 3], indirect=True)
@pytest.mark.parametrize("ids", [[[0, 3]], [[0, 1], [1, 0], [0, 1]]], ids=["1-token", "skewed"])
def test_expert_loop_on_several_threads_equals_reference_with_gradients(threads, ids):
    """With autograd the gather engine runs the per-expert loop (loop_experts), whose few-row
    products and their backward (through the transposed weights) split in blocks: output and
    every gradient equal the reference engine's."""
    g = torch.Generator().manual_seed(3)
    E, D, F_ = 4, 24, 48
    ids_TK = torch.tensor(ids)
    x = torch.randn(ids_TK.shape[0], D, generator=g)
    w = torch.softmax(torch.randn(ids_TK.shape, generator=g), -1)
    ws = [
        torch.randn(E, F_, D, generator=g),
        torch.randn(E, D, F_, generator=g),
        torch.randn(E, F_, D, generator=g),
    ]
    dy = torch.randn(x.shape, generator=g)
    grads = []
    for engine in (gather_dispatch, reference_dispatch):
        leaves = [t.clone().requires_grad_() for t in (x, w, *ws)]
        y = engine(leaves[0], ids_TK, leaves[1], leaves[2], leaves[3], leaves[4])
        y.backward(dy)
        grads.append([y.detach(), *(t.grad for t in leaves)])
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
