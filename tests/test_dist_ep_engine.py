"""The expert-parallel engine alone against the reference engine in one process.

Two ranks hold different numbers of tokens (5 and 2); in the second case every assignment goes
to experts 0 and 1, so rank 1 (experts 2, 3) receives no row at all and must still take part in
both backward all-to-alls. Outputs and the gradients of the tokens, the gate weights and every
expert weight equal the single-process run on the concatenated tokens.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from smoe import distributed as sd
from smoe.dispatch import get_engine
from smoe.distributed.expert_parallel import ExpertParallelEngine

pytestmark = pytest.mark.dist

D, F, E, K, TOKENS = 6, 10, 4, 2, (5, 2)  # TOKENS: per rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inputs(starve_rank1: bool) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    T = sum(TOKENS)
    x_TD = torch.randn(T, D, generator=gen)
    hi = E // 2 if starve_rank1 else E
    ids_TK = torch.stack([torch.randperm(hi, generator=gen)[:K] for _ in range(T)])
    weights_TK = torch.rand(T, K, generator=gen)
    w1, w3 = torch.randn(E, F, D, generator=gen), torch.randn(E, F, D, generator=gen)
    return x_TD, ids_TK, weights_TK, w1, torch.randn(E, D, F, generator=gen), w3


def run(engine, x_TD, ids_TK, weights_TK, w1, w2, w3) -> dict[str, torch.Tensor]:
    leaves = [t.clone().requires_grad_() for t in (x_TD, weights_TK, w1, w2, w3)]
    x, w, a, b, c = leaves
    y_TD = engine(x, ids_TK, w, a, b, c)
    y_TD.pow(2).sum().backward()
    return {"y": y_TD.detach(), **{n: t.grad for n, t in zip(("x", "weights", "w1", "w2", "w3"), leaves)}}


def worker(rank: int, world: int, port: int, starve_rank1: bool, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    sd.init_distributed(timeout_s=60)
    x_TD, ids_TK, weights_TK, w1, w2, w3 = inputs(starve_rank1)
    rows = slice(sum(TOKENS[:rank]), sum(TOKENS[: rank + 1]))
    experts = slice(rank * E // world, (rank + 1) * E // world)
    engine = ExpertParallelEngine(torch.distributed.group.WORLD, E, get_engine("reference"))
    got = run(engine, x_TD[rows], ids_TK[rows], weights_TK[rows], w1[experts], w2[experts], w3[experts])
    torch.save(got, f"{out}/rank{rank}.pt")
    sd.shutdown()


@pytest.mark.parametrize("starve_rank1", [False, True], ids=["uneven", "rank1_gets_nothing"])
def test_ep_engine_matches_one_process(tmp_path, starve_rank1):
    mp.spawn(worker, args=(2, free_port(), starve_rank1, str(tmp_path)), nprocs=2, join=True)
    want = run(get_engine("reference"), *inputs(starve_rank1))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    if starve_rank1:
        assert want["w1"][E // 2 :].abs().sum() == 0  # experts 2, 3 got nothing
    for name in ("y", "x", "weights"):  # per token: concatenate the ranks' rows
        torch.testing.assert_close(torch.cat([g[name] for g in ranks]), want[name], msg=name)
    for name in ("w1", "w2", "w3"):  # per expert: concatenate the ranks' experts
        torch.testing.assert_close(torch.cat([g[name] for g in ranks]), want[name], msg=name)
