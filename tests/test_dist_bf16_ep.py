"""``train`` under 2 processes (gloo) with ``dtype="bf16"`` and expert parallelism, and a
layout that does not fit the world.

With bf16 the loop wraps every MoE engine for autocast after ``parallelize``, so the engine is
``BF16Engine(ExpertParallelEngine(...))``. Gradient norm, clipping and checkpoint gathering
must still find the EP engine under the wrapper. Checked: the clipping norm is the same on both
ranks, the replicated weights stay bitwise equal, the run stops, saves all 4 experts, resumes
and exports, and it matches one process with ``grad_accum`` doubled (the peer) to bf16
round-off. The bad layout (ep=4 on 2 ranks) must fail before rank 0 writes anything.

One spawn runs all of it; each ``train`` call starts its own process group (its own port).
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

import smoe
from smoe import distributed as sd
from smoe.train import checkpoint as ckpt
from smoe.train import loop
from smoe.train.export import model_from_run
from smoe.train.loop import train
from test_dist_parallel import free_port, spawn
from test_train_loop import MODEL, losses, make_corpus, tcfg

pytestmark = pytest.mark.dist

STEPS, STOP = 3, 1
BF16_MODEL = MODEL.replace(router_jitter=0.0)  # jitter noise differs per rank (by design)
# A clip far below the gradient norm, so every step is clipped by the norm under test.
BF16_CFG = tcfg(steps=STEPS, grad_accum=1, warmup_steps=1, eval_every=0, ckpt_every=0, dtype="bf16",
                grad_clip=1e-3)  # fmt: skip


def _recording(real, log: list):
    """``loop.train_step`` that also records this rank's clipping norm and a replicated weight."""

    def step(model, *args, **kwargs):
        metrics = real(model, *args, **kwargs)
        emb = sd.unwrap(model).tok_embeddings.weight.detach().clone()
        log.append({"grad_norm": metrics["grad_norm"], "tok_embeddings": emb})
        return metrics

    return step


def worker(rank: int, world: int, _port: int, out: str, corpus: str, ports: list[int]) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    port = iter(ports)

    def run(run_dir: str, **kw) -> dict:
        os.environ["MASTER_PORT"] = str(next(port))
        return train(run_dir, corpus_dir=corpus, progress=False, **kw)

    result: dict = {}
    try:
        run(f"{out}/bad", model_cfg=BF16_MODEL, train_cfg=BF16_CFG, parallel=sd.ParallelConfig(ep=4))
    except sd.MeshError as e:
        result["bad"] = str(e)
    parallel = sd.ParallelConfig(ep=2, timeout_s=60)
    real, log = loop.train_step, []
    loop.train_step = _recording(real, log)
    try:
        result["stopped"] = run(f"{out}/bf16", model_cfg=BF16_MODEL, train_cfg=BF16_CFG, parallel=parallel,
                                stop_after=STOP)  # fmt: skip
        result["resumed"] = run(f"{out}/bf16", parallel=parallel, resume=True)
    finally:
        loop.train_step = real
    result["steps"] = log
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_bf16_ep")
    corpus = make_corpus(out / "corpus")
    spawn(worker, 2, str(out), str(corpus), [free_port() for _ in range(3)])
    train(out / "ref", BF16_MODEL, dataclasses.replace(BF16_CFG, grad_accum=2), corpus, progress=False)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_bf16_ep_clips_by_one_global_norm(runs):
    _, ranks = runs
    a, b = ranks[0]["steps"], ranks[1]["steps"]
    assert len(a) == len(b) == STEPS
    for i, (x, y) in enumerate(zip(a, b)):
        # Both ranks reduce the same sums: equal up to the order of float additions.
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-6), f"step {i + 1}"
        # DDP replicas drift apart as soon as the ranks clip by different factors.
        assert torch.equal(x["tok_embeddings"], y["tok_embeddings"]), f"step {i + 1}"


def test_bf16_ep_saves_resumes_and_matches_one_process(runs):
    out, ranks = runs
    run, ref = out / "bf16", out / "ref"
    assert ranks[0]["stopped"]["stopped"] == f"stop_after={STOP}"
    assert ranks[0]["resumed"]["step"] == STEPS
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    E = BF16_MODEL.num_experts
    assert state["model"]["layers.0.feed_forward.w1"].shape[0] == E
    exp_avg = state["optimizer"]["state"][state["optimizer_params"].index("layers.0.feed_forward.w1")][
        "exp_avg"
    ]
    assert exp_avg.shape[0] == E
    hf = smoe.load_model(run / "model").eval()
    assert hf.layers[0].feed_forward.w1.shape[0] == E

    # The peer: one process, twice the micro-batches (they agree to ~1e-5 here; bf16 sums in
    # another order). Final weights are compared through the validation loss: AdamW turns
    # bf16 noise in near-zero gradients into full-size updates, so single weights differ more.
    got, want = losses(run), losses(ref)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-3, atol=0)
    norms = [r["grad_norm"] for r in ranks[0]["steps"]]
    want_norms = [r["grad_norm"] for r in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines())
                  if r["kind"] == "train"]  # fmt: skip
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(want_norms), rtol=1e-3, atol=0)
    want_val = json.loads((ref / "summary.json").read_text())["val"]
    assert ranks[0]["resumed"]["val"] == pytest.approx(want_val, rel=1e-3)
    # The final Hugging Face save and the last checkpoint hold the same weights.
    tokens = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens), model_from_run(run)(tokens), rtol=0, atol=0)


def test_layout_that_does_not_fit_the_world_writes_nothing(runs):
    out, ranks = runs
    for r in range(2):
        assert ranks[r]["bad"] == "ep=4 does not divide the world size 2"
    assert not (out / "bad").exists()
