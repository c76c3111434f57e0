"""The triton engine equals the reference (output and all gradients), run by triton's
interpreter on CPU tensors (TRITON_INTERPRET=1), or on CUDA when there is one. Shapes are tiny:
the interpreter executes every program of the grid in numpy.

Legend: T tokens, D model dim, E experts, F expert hidden dim, K chosen experts per token.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
# triton reads TRITON_INTERPRET when it is imported (its standard library is jit-decorated
# then), so it must be set before the first `import triton` of the process. If something
# imported triton earlier, this file reruns itself in a fresh process instead.
FRESH = os.environ.get("TRITON_INTERPRET") == "1" or "triton" not in sys.modules
if not ON_CUDA and FRESH:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
RERUN = not ON_CUDA and not FRESH
in_this_process = pytest.mark.skipif(RERUN, reason="triton was imported without the interpreter; rerun below")

from smoe.dispatch import ENGINES  # noqa: E402
from test_dispatch_common import assert_matches_reference, make_problem  # noqa: E402

DEVICE = "cuda" if ON_CUDA else "cpu"


def on_device(problem):
    return tuple(t.to(DEVICE) for t in problem)


@pytest.mark.skipif(not RERUN, reason="the tests below run in this process")
def test_rerun_in_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@in_this_process
def test_kernels_run_in_the_interpreter():
    kernels = importlib.import_module("smoe.dispatch.triton_kernels")
    if not ON_CUDA:
        assert type(kernels.gmm_kernel).__name__ == "InterpretedFunction"


CASES = {
    "random": dict(T=7, D=16, F=32, E=4, K=2, seed=0),
    "T1": dict(T=1, D=16, F=32, E=4, K=2, seed=1),
    "ragged_dims": dict(T=5, D=20, F=24, E=3, K=2, seed=2),  # D, F not multiples of the blocks
    "K1_many_tokens": dict(T=40, D=16, F=16, E=2, K=1, seed=3),  # several row tiles per expert
}


@in_this_process
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_equals_reference_fp32(case):
    assert_matches_reference(ENGINES["triton"], on_device(make_problem(**CASES[case])), atol=1e-5, rtol=1e-4)


@in_this_process
@pytest.mark.parametrize(
    "ids",
    [
        [[3, 1]] * 6,  # all tokens to experts 3 and 1; experts 0 and 2 get none
        [[0, 4], [4, 1], [4, 4], [2, 0], [1, 2], [3, 0]],  # id E=4: dropped assignments
    ],
    ids=["experts_without_tokens", "dropped_assignments"],
)
def test_triton_edge_cases(ids):
    problem = make_problem(6, 16, 16, 4, 2, ids_TK=torch.tensor(ids))
    assert_matches_reference(ENGINES["triton"], on_device(problem))


@in_this_process
def test_triton_T0_and_non_contiguous():
    assert_matches_reference(ENGINES["triton"], on_device(make_problem(0, 16, 16, 4, 2)))
    x, ids, wts, w1, w2, w3 = on_device(make_problem(5, 16, 16, 4, 2))
    views = lambda x, wts, w1, w2, w3: (x.t().contiguous().t(), wts, w1.transpose(1, 2).contiguous().transpose(1, 2),
                                        w2, w3)  # fmt: skip
    assert_matches_reference(ENGINES["triton"], (x, ids.t().contiguous().t(), wts, w1, w2, w3), views=views)


@in_this_process
def test_triton_bf16():
    problem = on_device(make_problem(6, 32, 32, 4, 2, dtype=torch.bfloat16, seed=4))
    assert_matches_reference(ENGINES["triton"], problem, scale_tol=3e-2)


def test_block_n_spreads_decode_over_the_sms():
    block_n = importlib.import_module("smoe.dispatch.triton_engine").block_n
    h200 = 132
    # One token of Mixtral (A = 2 of E = 8): 128-column programs would be 2 * 32 = 64 for the
    # down projection; 32-column ones give 256 (and 896 for the up projection's 14336).
    assert block_n(2, 8, 16, 4096, h200) == 32
    assert block_n(2, 8, 16, 14336, h200) == 32
    # Batch 16 decode touches all 8 experts: 8 * 112 programs already fill the GPU.
    assert block_n(32, 8, 16, 14336, h200) == 128
    assert block_n(32, 8, 16, 4096, h200) == 32
    # Prefill and training: A / BM row tiles, full-width programs.
    assert block_n(16384, 8, 128, 4096, h200) == 128
    assert block_n(16384, 8, 128, 14336, h200) == 128
    # Narrow outputs keep their own power of two; one SM (the interpreter) never narrows.
    assert block_n(2, 8, 16, 16, h200) == 16
    assert block_n(2, 8, 16, 4096, 1) == 128


@in_this_process
def test_triton_refuses_unsupported_operands():
    """float64, weights in another dtype than x, or operands on another device than x would
    otherwise compile badly on CUDA (or run silently under the interpreter): refused by name."""
    x, ids, wts, w1, w2, w3 = on_device(make_problem(3, 16, 16, 2, 1))
    with pytest.raises(ValueError, match="triton.*float64"):
        ENGINES["triton"](x.double(), ids, wts, w1.double(), w2.double(), w3.double())
    with pytest.raises(ValueError, match="w1 is torch.float32 but x is torch.bfloat16"):
        ENGINES["triton"](x.bfloat16(), ids, wts, w1, w2.bfloat16(), w3.bfloat16())
    with pytest.raises(ValueError, match="w2 is on meta"):
        ENGINES["triton"](x, ids, wts, w1, w2.to("meta"), w3)
