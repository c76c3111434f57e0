"""Known answers: a model whose routing is hand-set to depend only on the token id.

With every attention output projection (wo) and every expert's w2 at zero, each block adds
nothing, so the residual stream at every layer is the token embedding. The embedding of token t
holds two one-hot features, and each layer's router reads one of them:

    dims 0..3: 2 at t % 4,          1 at (t + 1) % 4        (layers 0 and 1)
    dims 4..7: 2 at 4 + (t//10) % 4, 1 at 4 + (t//10 + 1) % 4  (layer 2)

Layer 0 routes t to experts (t % 4, (t+1) % 4), layer 1 to the same set through a permutation,
layer 2 to ((t//10) % 4, (t//10 + 1) % 4). RMSNorm only rescales positively, so the order holds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import smoe
from smoe.analysis import load_domain_records, run_analysis

E, K = 4, 2
PERM1 = [2, 0, 3, 1]  # layer 1: the logit of expert e reads feature dim PERM1[e]


def routed_model() -> smoe.Transformer:
    cfg = smoe.ModelConfig(
        dim=16, n_layers=3, head_dim=8, hidden_dim=8, n_heads=2, n_kv_heads=1, vocab_size=32000,
        max_seq_len=64, num_experts=E, top_k=K, rope_theta=1e4,
    )  # fmt: skip
    model = smoe.build_model(cfg, seed=0)
    t = torch.arange(cfg.vocab_size)
    with torch.no_grad():
        emb = torch.zeros(cfg.vocab_size, cfg.dim)
        emb[t, t % 4] += 2.0
        emb[t, (t + 1) % 4] += 1.0
        emb[t, 4 + (t // 10) % 4] += 2.0
        emb[t, 4 + (t // 10 + 1) % 4] += 1.0
        model.tok_embeddings.weight.copy_(emb)
        for i, layer in enumerate(model.layers):
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.zero_()
            gate = torch.zeros(E, cfg.dim)
            dims = [range(4), PERM1, range(4, 8)][i]
            for e, d in enumerate(dims):
                gate[e, d] = 1.0
            layer.feed_forward.gate.weight.copy_(gate)
    return model


def expected_experts(t: int, layer: int) -> tuple[int, int]:
    """(first, second) expert of token t at a layer, from the construction above."""
    if layer == 2:
        return (t // 10) % 4, (t // 10 + 1) % 4
    f, s = t % 4, (t + 1) % 4
    return (f, s) if layer == 0 else (PERM1.index(f), PERM1.index(s))


A = list(range(100, 108))  # t % 4 = 0,1,2,3,0,1,2,3; t // 10 = 10 for all
B = [203, 203, 203, 200]  # t % 4 = 3,3,3,0 — starts with the first-choice expert A ends with


def test_the_construction_routes_as_designed():
    model = routed_model()
    toks = torch.tensor([A + B])
    _, routings = model(toks, return_router=True)
    for layer, r in enumerate(routings):
        want = [expected_experts(t, layer) for t in A + B]
        assert r.expert_ids_TK.tolist() == [list(w) for w in want]


@pytest.mark.parametrize("seq_len,overlap,batch_size", [(64, 0, 8), (3, 0, 1), (5, 2, 3)])
def test_exact_shares_and_repeat_rates(tmp_path, seq_len, overlap, batch_size):
    """Hand-counted answers; windows and batching must not change any of them."""
    model = routed_model()
    s = run_analysis(
        model,
        None,
        {"d": [A, B]},
        tmp_path,
        seq_len=seq_len,
        overlap=overlap,
        batch_size=batch_size,
        progress=False,
        plots=False,
    )
    d = s["domains"]["d"]
    assert d["tokens"] == 12 and d["documents"] == 2 and d["pairs"] == 10
    # Layer 0. First choices: A 0,1,2,3,0,1,2,3  B 3,3,3,0 -> counts 3,2,2,5 of 12.
    assert d["first_choice_share"]["0"] == pytest.approx([3 / 12, 2 / 12, 2 / 12, 5 / 12])
    # All choices: A gives every expert 4; B gives {3,0} x3 and {0,1} -> 8,5,4,7 of 24.
    assert d["expert_share"]["0"] == pytest.approx([8 / 24, 5 / 24, 4 / 24, 7 / 24])
    # Repeats: A has none of its 7 pairs equal; B has 2 of 3. The A->B boundary pair (3, 3)
    # would be a repeat but crosses documents, so 2/10 (counting it would give 3/11).
    assert d["repeat_first"]["0"] == pytest.approx(2 / 10)
    assert d["repeat_any"]["0"] == pytest.approx(10 / 10)  # {a, a+1} always meets {a+1, a+2}
    assert d["repeat_first_independent"]["0"] == pytest.approx(
        (9 + 4 + 4 + 25) / 144
    )  # sum of squared shares
    # Layer 1 is layer 0 relabelled: the same repeat rates, permuted shares.
    assert d["repeat_first"]["1"] == pytest.approx(2 / 10)
    assert d["first_choice_share"]["1"] == pytest.approx([[3, 2, 2, 5][p] / 12 for p in PERM1])
    # Layer 2: A all (2, 3), B all (0, 1): every in-document pair repeats, the sets never overlap across.
    assert d["repeat_first"]["2"] == pytest.approx(1.0)
    assert d["repeat_any"]["2"] == pytest.approx(1.0)
    assert d["first_choice_share"]["2"] == pytest.approx([4 / 12, 0, 8 / 12, 0])
    assert d["expert_share"]["2"] == pytest.approx([4 / 24, 4 / 24, 8 / 24, 8 / 24])
    assert s["chance"] == {"first": 0.25, "any": pytest.approx(1 - 1 / 6)}
    # Co-selection at layer 0: pairs {0,1} x3 (100, 104, 200), {1,2} x2, {2,3} x2, {3,0} x5.
    co = np.array(d["coselection"]["0"])
    assert co[0, 1] == co[1, 0] == 3 and co[1, 2] == 2 and co[2, 3] == 2 and co[3, 0] == 5
    # The per-token records hold exactly the tokens, documents and experts, in order.
    rec = load_domain_records(tmp_path, "d")
    assert rec["token_ids"].tolist() == A + B
    assert rec["doc_ids"].tolist() == [0] * 8 + [1] * 4
    for layer in range(3):
        assert rec["expert_ids"][:, layer].tolist() == [list(expected_experts(t, layer)) for t in A + B]
    assert json.loads((tmp_path / "routing.json").read_text())["domains"]["d"]["tokens"] == 12


def test_random_documents_against_a_naive_count(tmp_path):
    """Many random documents, small windows: every number equals a plain loop over the tokens."""
    rng = np.random.default_rng(1)
    docs = [rng.integers(3, 400, rng.integers(1, 30)).tolist() for _ in range(15)]
    s = run_analysis(
        routed_model(), None, {"r": docs}, tmp_path, seq_len=7, batch_size=16, progress=False, plots=False
    )
    d = s["domains"]["r"]
    for layer in range(3):
        first = np.zeros(E)
        same = anyo = pairs = 0
        for doc in docs:
            ex = [expected_experts(t, layer) for t in doc]
            for f, _ in ex:
                first[f] += 1
            for a, b in zip(ex[:-1], ex[1:]):
                pairs += 1
                same += a[0] == b[0]
                anyo += bool(set(a) & set(b))
        assert d["pairs"] == pairs
        assert d["first_choice_share"][str(layer)] == pytest.approx((first / first.sum()).tolist())
        assert d["repeat_first"][str(layer)] == pytest.approx(same / pairs)
        assert d["repeat_any"][str(layer)] == pytest.approx(anyo / pairs)


def test_full_router_probabilities_are_recorded_on_request(tmp_path):
    run_analysis(
        routed_model(), None, {"d": [A, B]}, tmp_path, record_probs=True, progress=False, plots=False
    )
    rec = load_domain_records(tmp_path, "d")
    probs = np.asarray(rec["probs"], dtype=np.float32)  # (N, L, E) float16 on disk
    assert probs.shape == (12, 3, E)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=3e-3)
    np.testing.assert_array_equal(probs.argmax(-1), rec["expert_ids"][:, :, 0])
    # The kept weights are the softmax over the two chosen logits: their probabilities renormalised.
    top2 = np.take_along_axis(probs, rec["expert_ids"].astype(np.int64), -1)
    np.testing.assert_allclose(rec["weights"], top2 / top2.sum(-1, keepdims=True), atol=3e-3)


def test_max_tokens_caps_and_says_so(tmp_path):
    s = run_analysis(
        routed_model(), None, {"a": [A, A], "b": [B]}, tmp_path, max_tokens=10, progress=False, plots=False
    )
    assert s["max_tokens_per_domain"] == 5
    assert s["domains"]["a"]["tokens"] == 5 and s["domains"]["a"]["capped"]
    assert s["domains"]["b"]["tokens"] == 4 and not s["domains"]["b"]["capped"]
    assert "capped domains (later tokens not analysed): a" in (tmp_path / "report.html").read_text()


def test_analysis_layers_subset_and_errors(tmp_path):
    model = routed_model()
    s = run_analysis(model, None, {"d": [A]}, tmp_path, layers=[2], progress=False, plots=False)
    assert s["layers"] == [2] and list(s["domains"]["d"]["repeat_first"]) == ["2"]
    with pytest.raises(ValueError, match="MoE layers"):
        run_analysis(model, None, {"d": [A]}, tmp_path, layers=[5], progress=False, plots=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        run_analysis(model, None, {"d": ["some text"]}, tmp_path, progress=False, plots=False)
    dense = smoe.build_model(smoe.ModelConfig.preset("tiny-dense", vocab_size=64, n_layers=1))
    with pytest.raises(ValueError, match="dense"):
        run_analysis(dense, None, {"d": [[1, 2, 3]]}, tmp_path, progress=False, plots=False)


def test_recording_leaves_the_model_and_its_logits_unchanged(tmp_path):
    model = smoe.build_model(smoe.ModelConfig.preset("tiny", vocab_size=512, n_layers=2), seed=3)
    model.train()
    toks = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.eval()
        before = model(toks)
        with_router, routings = model(toks, return_router=True)
        model.train()
    torch.testing.assert_close(with_router, before, rtol=0, atol=0)  # recording on: same logits
    assert len(routings) == 2 and routings[0].expert_ids_TK.shape == (48, 2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    run_analysis(model, None, {"d": toks.tolist()}, tmp_path, progress=False, plots=False)
    assert model.training  # mode restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # no hooks left
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(toks), before, rtol=0, atol=0)  # recording off: unchanged


@pytest.mark.parametrize("batch_size", [1, 4])
def test_pairs_count_across_window_edges_but_not_across_documents(tmp_path, batch_size):
    """The pair rule on a hand-built case. Layer 0's first choice is t % 4. With seq_len 2 document X
    is recorded in windows [100, 101] [105, 102] [106]; its only repeats (1 -> 1, 2 -> 2) straddle
    the two window edges. Y's first token repeats X's last one, across the document boundary."""
    X, Y = [100, 101, 105, 102, 106], [202, 203]  # first choices 0 1 1 2 2 | 2 3
    s = run_analysis(
        routed_model(), None, {"d": [X, Y]}, tmp_path, seq_len=2, batch_size=batch_size,
        progress=False, plots=False,
    )  # fmt: skip
    d = s["domains"]["d"]
    assert d["pairs"] == 4 + 1  # n - 1 per document, whatever the windows
    # 2/5: edge pairs count (without them 0/3); the X -> Y pair does not (with it 3/6).
    assert d["repeat_first"]["0"] == pytest.approx(2 / 5)
