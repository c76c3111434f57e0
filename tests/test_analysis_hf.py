"""``smoe analyze`` on a checkpoint saved by transformers: the recorded experts and weights equal
the top-k of transformers' own router logits (the peer nobody here wrote)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from smoe.analysis import load_domain_records
from smoe.cli.main import main
from smoe.data.shards import FORMAT, write_split


@pytest.mark.slow
def test_recorded_routing_matches_transformers_router_logits(make_hf, tmp_path, capsys):
    hf_dir, hf_model = make_hf(num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2)
    rng = np.random.default_rng(0)
    docs = [[1, *rng.integers(3, 97, n).tolist(), 2] for n in (11, 30, 5)]
    corpus = tmp_path / "corpus"
    manifest = {
        "format": FORMAT,
        "vocab_size": 97,
        "domains": {"rand": {"val": write_split(corpus / "rand", "val", docs)}},
    }
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "r"
    rc = main(["analyze", "--model", str(hf_dir), "--data", str(corpus), "--out", str(out), "--seq-len", "64",
               "--no-plots"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    rec = load_domain_records(out, "rand")
    assert rec["token_ids"].tolist() == [t for d in docs for t in d]
    start = 0
    for doc in docs:
        with torch.no_grad():
            router_logits = hf_model(torch.tensor([doc]), output_router_logits=True).router_logits
        assert len(router_logits) == 3
        for layer, logits_TE in enumerate(router_logits):
            top_TK = torch.topk(logits_TE.float(), 2, dim=-1)
            got = rec["expert_ids"][start : start + len(doc), layer]
            np.testing.assert_array_equal(got, top_TK.indices.numpy())
            w = torch.softmax(top_TK.values, -1).numpy()
            np.testing.assert_allclose(
                rec["weights"][start : start + len(doc), layer], w, atol=2e-3
            )  # float16
        start += len(doc)


def test_token_ids_outside_the_vocabulary_fail_loudly(make_hf, tmp_path, capsys):
    hf_dir, _ = make_hf()
    (tmp_path / "a.txt").write_text("Text tokenised with the 32000-token Mixtral vocabulary.")
    rc = main(
        ["analyze", "--model", str(hf_dir), "--data", f"t={tmp_path}/a.txt", "--out", str(tmp_path / "o")]
    )
    assert rc == 2 and "vocabulary has 97 entries" in capsys.readouterr().err


def test_recording_runs_the_head_on_one_position_only(make_hf):
    """Routing is all the recorder keeps, so the output head sees one row per sequence, not T."""
    import smoe
    from smoe.analysis.record import route_documents

    hf_dir, _ = make_hf(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)
    model = smoe.load_model(hf_dir).eval()
    head_rows = []
    model.output.register_forward_hook(lambda mod, args, out: head_rows.append(args[0].shape[:-1]))
    docs = [np.arange(3, 40), np.arange(5, 20)]
    with torch.no_grad():
        chunks = list(route_documents(model, docs, layers=[0, 1], seq_len=64, batch_size=2))
    assert head_rows == [torch.Size([2, 1])]
    assert sum(len(c.token_ids_N) for c in chunks) == 37 + 15
    assert all(c.expert_ids_NLK.shape[1:] == (2, 2) for c in chunks)
