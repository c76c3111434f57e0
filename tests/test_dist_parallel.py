"""Multi-process runs (gloo, CPU) against the single-process run on the concatenated batch.

One spawn of 2 processes runs one training step (forward, cross-entropy + load-balancing +
z-loss, backward, SGD step) under DDP, FSDP2, EP (+DDP) and EP + FSDP2, and saves a
checkpoint; a 4-process spawn (slow) does dp=2 x ep=2. The parent process computes the
single-process reference: the same model on the whole global batch, with the router losses
taken per rank's rows (each rank balances its own batch, as in data-parallel training).

Routing is made awkward on purpose: the last expert's router logit is pushed down by 1e4 so
it never receives a token, and the counts per expert are uneven (both checked).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import smoe
from smoe import distributed as sd
from smoe.config import ModelConfig
from smoe.model.moe import Router, RouterOutput
from smoe.train.losses import load_balancing_loss, router_z_loss

pytestmark = pytest.mark.dist

CFG = ModelConfig(
    dim=32, n_layers=2, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, vocab_size=97,
    max_seq_len=64, num_experts=4, top_k=2, dispatch="reference",
)  # fmt: skip
SEQ, ROWS_PER_RANK, LR, MAX_NORM, CAPACITY = 8, 2, 0.5, 0.05, 0.75
AUX, ZLOSS = 0.02, 1e-3
# layout -> (parallel config, the local dispatch engine the model runs)
LAYOUTS = {
    "ddp": (dict(ep=1, data_parallel="ddp"), "reference"),
    "fsdp": (dict(ep=1, data_parallel="fsdp"), "sorted"),
    "ep": (dict(ep=2, data_parallel="ddp"), "reference"),
    "ep_fsdp": (dict(ep=2, data_parallel="fsdp"), "sorted"),
}


class BiasedRouter(Router):
    """The model's router plus a fixed logit bias, here to starve the last expert."""

    def __init__(self, router: Router):
        nn.Module.__init__(self)
        self.top_k, self.jitter, self.weight = router.top_k, router.jitter, router.weight
        bias_E = torch.zeros(router.weight.shape[0])
        bias_E[-1] = -1e4
        self.register_buffer("bias_E", bias_E, persistent=False)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        logits_TE = F.linear(x_TD.float(), self.weight.float()) + self.bias_E
        top_TK, ids_TK = torch.topk(logits_TE, self.top_k, dim=-1)
        return RouterOutput(logits_TE, ids_TK, torch.softmax(top_TK, dim=-1))


def make_model(biased: bool = True, dispatch: str = "reference", **changes) -> smoe.Transformer:
    model = smoe.build_model(CFG.replace(dispatch=dispatch, **changes), seed=0)
    with torch.no_grad():  # random norms, so their gradients are tested too
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    if biased:
        for layer in model.layers:
            layer.feed_forward.gate = BiasedRouter(layer.feed_forward.gate)
    return model


def global_batch(world: int, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (ROWS_PER_RANK * world, SEQ + 1), generator=gen)


def local_loss(model: nn.Module, tokens_BT: torch.Tensor, pieces: int) -> torch.Tensor:
    """Mean over ``pieces`` equal row blocks of (CE + router losses of that block)."""
    logits_BTV, routing = model(tokens_BT[:, :-1], return_router=True)
    ce = F.cross_entropy(logits_BTV.reshape(-1, CFG.vocab_size), tokens_BT[:, 1:].reshape(-1))
    aux = torch.zeros(())
    for r in range(pieces):
        rows = slice(r * ROWS_PER_RANK * SEQ, (r + 1) * ROWS_PER_RANK * SEQ)
        logits = [o.logits_TE[rows] for o in routing]
        aux = aux + AUX * load_balancing_loss(logits, CFG.top_k) + ZLOSS * router_z_loss(logits)
    return ce + aux / pieces


def reference(world: int) -> dict:
    model = make_model()
    tokens = global_batch(world)
    loss = local_loss(model, tokens, pieces=world)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    with torch.no_grad():
        _, routing = model(tokens[:, :-1], return_router=True)
        counts = [o.tokens_per_expert() for o in routing]
        for p in model.parameters():
            p -= LR * p.grad
        logits = model(tokens[:, :-1])
    params = dict(model.named_parameters())
    return dict(loss=loss.detach(), grads=grads, norm=norm, counts=counts, logits=logits, params=params)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> None:
    """Run fn(rank, world, port, *args) in ``world`` fresh processes; raises if any fails."""
    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


def init(rank: int, world: int, port: int) -> None:
    """What torchrun would set, then the library's own start-up."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    assert sd.init_distributed(timeout_s=60)


def train_worker(rank: int, world: int, port: int, out_dir: str, layouts: list[str], bf16_layouts=()) -> None:
    init(rank, world, port)
    results = {}
    try:
        for name in layouts:
            layout, dispatch = LAYOUTS[name]
            model = sd.parallelize(make_model(dispatch=dispatch), sd.ParallelConfig(**layout))
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            loss = local_loss(model, sd.shard_batch(global_batch(world)), pieces=1)
            loss.backward()
            grads = sd.gather_full_params(model, grads=True)
            norm = sd.clip_grad_norm_(model, MAX_NORM)
            opt.step()
            mean_loss = loss.detach().clone()
            torch.distributed.all_reduce(mean_loss)
            with torch.no_grad():
                logits = model(global_batch(world)[:, :-1])  # every rank the same tokens
            params = sd.gather_full_params(model)
            results[name] = dict(loss=mean_loss / world, grads=grads, norm=norm, logits=logits, params=params)
            if name == layouts[-1]:  # a checkpoint of the last (most sharded) layout
                sd.save_distributed(model, os.path.join(out_dir, "ckpt"))
        for name in bf16_layouts:  # FSDP2 MixedPrecisionPolicy: bf16 compute, fp32 reduction
            model = sd.parallelize(
                make_model(),
                sd.ParallelConfig(ep=LAYOUTS[name][0]["ep"], data_parallel="fsdp", param_dtype="bf16"),
            )
            loss = local_loss(model, sd.shard_batch(global_batch(world)), pieces=1).float()
            loss.backward()
            loss = loss.detach()
            torch.distributed.all_reduce(loss)
            results[name + "_bf16"] = dict(loss=loss / world, grads=sd.gather_full_params(model, grads=True))
        # Capacity limit under EP: each rank drops over its own tokens, so rank r's logits and
        # loss are those of one process on rank r's rows alone.
        model = sd.parallelize(make_model(capacity_factor=CAPACITY), sd.ParallelConfig(ep=2))
        tokens = sd.shard_batch(global_batch(world))
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, CFG.vocab_size), tokens[:, 1:].reshape(-1)).backward()
        parts = [torch.empty_like(logits) for _ in range(world)]
        torch.distributed.all_gather(parts, logits.detach())
        grads = sd.gather_full_params(model, grads=True)
        results["capacity"] = dict(logits=torch.cat(parts), grads=grads)
        try:
            sd.parallelize(make_model(), sd.ParallelConfig(ep=3))
        except sd.MeshError as e:
            results["mesh_error"] = str(e)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        sd.shutdown()


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """float32 summation-order noise: 1e-4 relative, plus 1e-5 of the tensor's largest entry."""
    atol = 1e-5 * float(b.abs().max()) + 1e-12
    torch.testing.assert_close(a, b, rtol=1e-4, atol=atol, msg=lambda m: f"{what}: {m}")


def check_layout(results: dict, ref: dict, name: str) -> None:
    got = results[name]
    _close(got["loss"], ref["loss"], f"{name} loss")
    assert got["grads"].keys() == ref["grads"].keys()
    for k, g in ref["grads"].items():
        _close(got["grads"][k], g, f"{name} grad {k}")
    _close(got["norm"], ref["norm"], f"{name} global grad norm")
    for k, p in ref["params"].items():
        _close(got["params"][k], p.detach(), f"{name} param after clipping and an SGD step {k}")
    _close(got["logits"], ref["logits"], f"{name} logits after step")


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist2")
    spawn(train_worker, 2, str(out), list(LAYOUTS), ["fsdp", "ep_fsdp"])
    return torch.load(out / "results.pt", weights_only=False), out


@pytest.fixture(scope="module")
def ref2():
    ref = reference(2)
    # The awkward cases are really there: a starved expert and uneven counts.
    for counts in ref["counts"]:
        assert counts[-1] == 0 and len(set(counts[:-1].tolist())) > 1, counts
    assert ref["norm"] > 2 * MAX_NORM  # clipping really scales
    return ref


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_one_step_matches_single_process(two_rank_run, ref2, layout):
    check_layout(two_rank_run[0], ref2, layout)


@pytest.mark.parametrize("layout", ["fsdp", "ep_fsdp"])
def test_bf16_params_stay_close_to_fp32(two_rank_run, ref2, layout):
    """bf16 has 8 bits of mantissa: loss within 1%, each gradient within 5% (relative L2)."""
    got = two_rank_run[0][layout + "_bf16"]
    assert got["grads"]["output.weight"].dtype == torch.float32  # fp32 master grads
    assert abs(got["loss"] - ref2["loss"]) < 0.01 * ref2["loss"]
    for k, g in ref2["grads"].items():
        err = float((got["grads"][k] - g).norm() / g.norm())
        assert err < 0.05, (k, err)


def test_capacity_drops_under_ep_match_per_rank_single_process(two_rank_run):
    model = make_model(capacity_factor=CAPACITY)
    tokens = global_batch(2)
    logits, dropped, loss = [], 0, 0.0
    for r in range(2):
        rows = tokens[r * ROWS_PER_RANK : (r + 1) * ROWS_PER_RANK]
        out, routing = model(rows[:, :-1], return_router=True)
        logits.append(out.detach())
        dropped += sum(int(o.dropped_TK.sum()) for o in routing)
        loss = loss + F.cross_entropy(out.reshape(-1, CFG.vocab_size), rows[:, 1:].reshape(-1)) / 2
    loss.backward()
    assert dropped > 0  # the limit really drops assignments here
    got = two_rank_run[0]["capacity"]
    _close(got["logits"], torch.cat(logits), "logits with a capacity limit under EP")
    for k, p in model.named_parameters():
        _close(got["grads"][k], p.grad, f"grad with a capacity limit under EP {k}")


def test_distributed_checkpoint_loads_in_one_process(two_rank_run, ref2):
    results, out = two_rank_run
    model = smoe.load_model(out / "ckpt")
    for layer in model.layers:  # same routing as the run that saved it
        layer.feed_forward.gate = BiasedRouter(layer.feed_forward.gate)
    with torch.no_grad():
        logits = model(global_batch(2)[:, :-1])
    _close(logits, results[list(LAYOUTS)[-1]]["logits"], "logits of the reloaded checkpoint")
    _close(logits, ref2["logits"], "logits of the reloaded checkpoint vs reference")


def test_mesh_that_does_not_divide_is_rejected_in_run(two_rank_run):
    assert "ep=3 does not divide the world size 2" in two_rank_run[0]["mesh_error"]


def test_mesh_rejections_name_the_numbers():
    with pytest.raises(sd.MeshError, match=r"ep=3 does not divide num_experts=8"):
        sd.ParallelConfig(ep=3).resolve(world_size=6, num_experts=8)
    with pytest.raises(sd.MeshError, match=r"dp=3 x ep=2 = 6 ranks, but the world size is 4"):
        sd.ParallelConfig(dp=3, ep=2).resolve(world_size=4, num_experts=8)
    with pytest.raises(sd.MeshError, match=r"ep=4 does not divide the world size 6"):
        sd.ParallelConfig(ep=4).resolve(world_size=6, num_experts=8)
    with pytest.raises(sd.MeshError, match=r"ep=2 does not divide the world size 1"):
        sd.parallelize(make_model(biased=False), sd.ParallelConfig(ep=2))  # one process, no group
    with pytest.raises(sd.MeshError, match=r"ep=2 needs a mixture-of-experts model, but num_experts=1"):
        sd.ParallelConfig(ep=2).resolve(world_size=2, num_experts=1)  # dense: said as such
    assert sd.ParallelConfig(ep=2).resolve(world_size=8, num_experts=8).dp == 4


def test_single_process_parallelize_is_identity():
    model = make_model(biased=False)
    assert sd.parallelize(model, sd.ParallelConfig()) is model


@pytest.mark.slow
def test_dp2_ep2_on_four_processes(tmp_path):
    spawn(train_worker, 4, str(tmp_path), ["ep", "ep_fsdp"])
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    ref = reference(4)
    for name in ("ep", "ep_fsdp"):
        check_layout(results, ref, name)
