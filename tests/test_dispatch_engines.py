"""Every CPU engine equals the reference loop: output and gradients (x, routing weights, w1, w2,
w3), property-based in float32, bfloat16 within its tolerance, and the edge cases.

Legend: T tokens, D model dim, E experts, F expert hidden dim, K chosen experts per token.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smoe.dispatch import ENGINES, choose_engine, get_engine
from smoe.dispatch import sorted_engine as sorted_mod
from smoe.dispatch.gather import _gather_decode, _gather_host_loop, _gather_index_select
from smoe.dispatch.reference import reference_dispatch
from test_dispatch_common import assert_matches_reference, make_problem


def sorted_grouped(*args):
    """The sorted engine forced onto torch._grouped_mm where the shapes allow it (the CPU
    default is the loop)."""
    x_TD, _, _, w1, w2, w3 = args
    grouped = sorted_mod.can_grouped_mm(x_TD.contiguous(), w1, w2, w3)
    return sorted_mod.sorted_dispatch(*args, grouped=grouped)


CPU_ENGINES = {
    "sorted": ENGINES["sorted"],
    "sorted_grouped_mm": sorted_grouped,
    "gather_host_loop": _gather_host_loop,
    "gather_index_select": _gather_index_select,  # the accelerator path, run here on CPU
    # The CPU decode loop (no autograd in the engine; under autograd it is still exact, so
    # the gradient checks below hold for it too).
    "gather_decode": _gather_decode,
    "auto": ENGINES["auto"],
}


@st.composite
def problems(draw):
    E = draw(st.integers(1, 6))
    K = draw(st.integers(1, E))
    T = draw(st.integers(0, 12))
    # D, F multiples of 4 can take torch._grouped_mm (16-byte rows in float32); others cannot.
    D = draw(st.sampled_from([4, 8, 12, 5, 7]))
    F = draw(st.sampled_from([8, 16, 6, 9]))
    return T, D, F, E, K, draw(st.integers(0, 2**16))


@pytest.mark.parametrize("name", sorted(CPU_ENGINES))
@settings(max_examples=25, deadline=None)
@given(spec=problems())
def test_engine_equals_reference_fp32(name, spec):
    T, D, F, E, K, seed = spec
    assert_matches_reference(CPU_ENGINES[name], make_problem(T, D, F, E, K, seed=seed))


@pytest.mark.parametrize("name", sorted(CPU_ENGINES))
@settings(max_examples=25, deadline=None)
@given(spec=problems())
def test_engine_equals_reference_without_grad(name, spec):
    """Without autograd the engines take other paths: the decode loop (gather on CPU), and
    in-place silu * h3 in the grouped products."""
    T, D, F, E, K, seed = spec
    x, ids, wts, w1, w2, w3 = make_problem(T, D, F, E, K, seed=seed)
    with torch.no_grad():
        got = CPU_ENGINES[name](x, ids, wts, w1, w2, w3)
        want = reference_dispatch(x, ids, wts, w1, w2, w3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_decode_loop_runs_without_grad(monkeypatch):
    """gather on CPU takes the decode loop exactly when no gradient is needed and T*K <= E."""
    from smoe.dispatch import gather

    calls = []
    monkeypatch.setattr(gather, "_gather_decode", lambda *a: calls.append(1) or _gather_decode(*a))
    x, ids, wts, w1, w2, w3 = make_problem(1, 8, 16, 4, 2)
    with torch.no_grad():
        gather.gather_dispatch(x, ids, wts, w1, w2, w3)
    assert calls == [1]
    with torch.no_grad():
        gather.gather_dispatch(*make_problem(3, 8, 16, 4, 2))  # 6 assignments > 4 experts
    assert_matches_reference(gather.gather_dispatch, (x, ids, wts, w1, w2, w3))  # with grad
    assert calls == [1]


@pytest.mark.parametrize("name", sorted(CPU_ENGINES))
@pytest.mark.parametrize("T", [1, 5, 40])
def test_engine_equals_reference_bf16(name, T):
    problem = make_problem(T, D=32, F=48, E=4, K=2, dtype=torch.bfloat16, seed=T)
    # bf16 keeps 8 mantissa bits; engines round in a different order than the loop.
    assert_matches_reference(CPU_ENGINES[name], problem, scale_tol=3e-2)


def edge_cases():
    T, E = 9, 5
    cases = {
        "T0": (make_problem(0, 8, 16, E, 2), None),
        "T1": (make_problem(1, 8, 16, E, 2), None),
        "all_to_one_expert": (None, torch.stack([torch.full((T,), 3), torch.full((T,), 1)], dim=1)),
        "experts_without_tokens": (None, torch.tensor([[0, 2]] * T)),
        "K_equals_E": (make_problem(T, 8, 16, 3, 3), None),
        "K1": (make_problem(T, 8, 16, E, 1), None),
        # More rows per expert than loop_experts.ROW_BY_ROW_MAX: whole products, not rows.
        "many_rows_per_expert": (make_problem(48, 8, 16, 2, 1), None),
        # Expert id E marks an assignment dropped by the capacity limit: it contributes nothing.
        "dropped_assignments": (None, torch.tensor([[0, E], [E, 1], [E, E], [4, 0], [1, 2]] + [[2, 3]] * 4)),
    }
    out = {}
    for name, (problem, ids) in cases.items():
        out[name] = problem if ids is None else make_problem(T, 8, 16, E, 2, ids_TK=ids)
    return out


EDGE = edge_cases()


@pytest.mark.parametrize("name", sorted(CPU_ENGINES))
@pytest.mark.parametrize("case", sorted(EDGE))
def test_edge_cases(name, case):
    assert_matches_reference(CPU_ENGINES[name], EDGE[case])


@pytest.mark.parametrize("name", sorted(CPU_ENGINES))
@pytest.mark.parametrize("case", sorted(EDGE))
def test_edge_cases_without_grad(name, case):
    x, ids, wts, w1, w2, w3 = EDGE[case]
    with torch.no_grad():
        got = CPU_ENGINES[name](x, ids, wts, w1, w2, w3)
        want = reference_dispatch(x, ids, wts, w1, w2, w3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def non_contiguous(x, wts, w1, w2, w3):
    """Same values in other memory layouts: transposed storage and strided views."""
    views = (
        x.t().contiguous().t(),
        torch.stack([wts, torch.zeros_like(wts)], dim=-1)[..., 0],
        w1.transpose(1, 2).contiguous().transpose(1, 2),
        torch.stack([w2, torch.zeros_like(w2)], dim=-1)[..., 0],
        w3[:, :, None, :].expand(-1, -1, 2, -1)[:, :, 0],
    )
    assert not any(v.is_contiguous() for v in views[:4])
    return views


@pytest.mark.parametrize("name", sorted(CPU_ENGINES))
def test_non_contiguous_inputs(name):
    x, ids, wts, w1, w2, w3 = make_problem(7, 8, 16, 4, 2)
    ids_nc = ids.t().contiguous().t()
    assert not ids_nc.is_contiguous()
    assert_matches_reference(CPU_ENGINES[name], (x, ids_nc, wts, w1, w2, w3), views=non_contiguous)


def test_grouped_mm_path_is_taken_when_aligned():
    x, ids, wts, w1, w2, w3 = make_problem(6, 8, 16, 4, 2)
    assert sorted_mod.can_grouped_mm(x, w1.transpose(1, 2), w2.transpose(1, 2), w3.transpose(1, 2))
    assert not sorted_mod.can_grouped_mm(x[:, :5].contiguous(), w1[..., :5].contiguous().transpose(1, 2))


def test_grouped_mm_avoided_in_float32_under_torch_compile(monkeypatch):
    """torch.compile's shape function for grouped_mm takes bfloat16 only; the CPU kernel runs
    float32, so the sorted engine uses it eagerly but not while being compiled."""
    x, ids, wts, w1, w2, w3 = make_problem(6, 8, 16, 4, 2)
    ws = (w1.transpose(1, 2), w2.transpose(1, 2), w3.transpose(1, 2))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not sorted_mod.can_grouped_mm(x, *ws)
    assert sorted_mod.can_grouped_mm(x.bfloat16(), *(w.bfloat16() for w in ws))


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    """A compiled forward + backward through the sorted engine at >= CPU_GROUPED_MIN_ROWS rows
    per expert (where eager uses grouped_mm) runs and equals eager."""
    torch._dynamo.reset()
    D, F, E, K, T = 16, 32, 2, 1, 2 * sorted_mod.CPU_GROUPED_MIN_ROWS
    x, ids, wts, w1, w2, w3 = make_problem(T, D, F, E, K)
    ws = [w.clone().requires_grad_() for w in (w1, w2, w3)]

    def f(x, *ws):
        return sorted_mod.sorted_dispatch(x, ids, wts, *ws).square().sum()

    eager = torch.autograd.grad(f(x, *ws), ws)
    compiled = torch.autograd.grad(torch.compile(f)(x, *ws), ws)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_auto_resolves_per_call():
    x, ids, *_ = make_problem(1, 8, 16, 8, 2)
    assert choose_engine(x, ids, 8) == "gather"
    x, ids, *_ = make_problem(64, 8, 16, 8, 2)
    assert choose_engine(x, ids, 8) == "sorted"
    assert get_engine("auto") is ENGINES["auto"]
    with pytest.raises(ValueError, match="unknown dispatch engine 'nope'"):
        get_engine("nope")


@pytest.mark.parametrize("T", [3, 48])
def test_row_by_row_products(monkeypatch, T):
    """Row-by-row products (used for few rows of large weights) equal the reference too."""
    from smoe.dispatch import loop_experts

    monkeypatch.setattr(loop_experts, "ROW_BY_ROW_MIN_WEIGHT", 0)
    assert loop_experts.row_by_row(3, torch.empty(4, 4))
    assert_matches_reference(ENGINES["sorted"], make_problem(T, 8, 16, 3, 2, seed=T))


def test_padded_and_loop_paths_are_both_taken():
    """Balanced routing takes the padded batched products, skewed routing the loop."""
    from smoe.dispatch.padded_experts import use_padded

    assert use_padded([5, 5, 4, 5]) and not use_padded([9, 1, 5, 5]) and not use_padded([0, 0])
    balanced = torch.arange(24).remainder(4).view(12, 2)  # every expert 6 rows
    skewed = torch.tensor([[0, 1]] * 10 + [[2, 3]] * 2)
    for ids in (balanced, skewed):
        for dropped in (False, True):
            ids_TK = (
                ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.2, 4)
                if dropped
                else ids
            )
            problem = make_problem(12, 8, 16, 4, 2, ids_TK=ids_TK)
            assert_matches_reference(ENGINES["sorted"], problem)
            with torch.no_grad():  # without a backward the padded path works in place
                torch.testing.assert_close(ENGINES["sorted"](*problem), reference_dispatch(*problem))


def test_triton_on_cpu_fails_loudly(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises((ValueError, ImportError), match="triton"):
        ENGINES["triton"](*make_problem(2, 8, 16, 4, 2))


def test_cpu_chooses_grouped_mm_for_many_rows(monkeypatch):
    calls, grouped = [], sorted_mod._experts_grouped
    monkeypatch.setattr(sorted_mod, "CPU_GROUPED_MIN_ROWS", 2)
    monkeypatch.setattr(sorted_mod, "_experts_grouped", lambda *a: calls.append(1) or grouped(*a))
    assert_matches_reference(ENGINES["sorted"], make_problem(12, 8, 16, 4, 2))
    assert calls, "12 tokens * 2 / 4 experts = 6 rows per expert >= 2: grouped_mm expected"


def strided_weights(x, wts, w1, w2, w3):
    """w1 as every 4th column of a wider tensor: each stride is a multiple of 16 bytes in
    float32, but none is 1, a layout torch._grouped_mm rejects ("Invalid strides/sizes")."""
    w1_wide = torch.stack([w1, torch.zeros_like(w1), torch.zeros_like(w1), torch.zeros_like(w1)], dim=-1)
    return x, wts, w1_wide.flatten(-2)[..., ::4], w2, w3


def test_grouped_mm_declined_for_weights_without_a_unit_stride():
    x, ids, wts, w1, w2, w3 = make_problem(8, 8, 16, 4, 2)
    w1_strided = strided_weights(x, wts, w1, w2, w3)[2]
    assert 1 not in w1_strided.stride()
    assert not sorted_mod.can_grouped_mm(x, w1_strided, w2, w3)
    assert_matches_reference(sorted_grouped, (x, ids, wts, w1, w2, w3), views=strided_weights)


def test_grouped_mm_alignment_is_checked_on_cuda_too(monkeypatch):
    """CUDA's grouped_mm has the same 16-byte stride rule: bfloat16 rows of D = 20 (40 bytes)
    must fall back. A stand-in for a CUDA tensor, so that the rule is checked without a GPU."""
    from types import SimpleNamespace

    def fake_cuda(shape, strides):
        return SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, shape=torch.Size(shape),
                               stride=lambda: strides, data_ptr=lambda: 0, element_size=lambda: 2)  # fmt: skip

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    w1, w2 = fake_cuda((4, 32, 24), (768, 24, 1)), fake_cuda((4, 24, 32), (768, 32, 1))
    assert sorted_mod.can_grouped_mm(fake_cuda((6, 24), (24, 1)), w1, w2, w1)
    w1, w2 = fake_cuda((4, 32, 20), (640, 20, 1)), fake_cuda((4, 20, 32), (640, 32, 1))
    assert not sorted_mod.can_grouped_mm(fake_cuda((6, 20), (20, 1)), w1, w2, w1)


def test_grouped_mm_check_traces_under_compile():
    """While compiling, operands are fake tensors with no address: the alignment check must not
    read data_ptr there (it broke a fullgraph trace of the bf16 engine with a dynamo error)."""
    from smoe.dispatch.sorted_engine import can_grouped_mm

    x = torch.randn(16, 32, dtype=torch.bfloat16)
    w = torch.randn(4, 48, 32, dtype=torch.bfloat16)

    @torch.compile(backend="eager", fullgraph=True)
    def pick(x, w):
        return x * 2 if can_grouped_mm(x, w) else x * 3

    assert torch.equal(pick(x, w), x * 2 if can_grouped_mm(x, w) else x * 3)
