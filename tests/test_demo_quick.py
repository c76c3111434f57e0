"""`smoe demo --quick` end to end: corpus, training, samples, routing report, summary."""

import json

import pytest
import torch
import transformers

from smoe.cli.main import main


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for what in (
        "[1/4] corpus",
        "[4/4] routing report",
        "unigram entropy",
        "routing report :",
        "report.html",
    ):
        assert what in printed
    result = json.loads((out / "demo.json").read_text())
    manifest = json.loads((out / "corpus" / "manifest.json").read_text())
    assert [r["domain"] for r in result["val_vs_unigram"]] == sorted(manifest["domains"])
    for r in result["val_vs_unigram"]:
        assert r["unigram_entropy"] == manifest["domains"][r["domain"]]["unigram_entropy_nats"]
    assert len(result["samples"]) == 4 and all(isinstance(s["text"], str) for s in result["samples"])
    for f in ("run/plots/loss.png", "run/plots/lr.png", "run/plots/imbalance.png", "routing/report.html"):
        assert (out / f).stat().st_size > 1000, f
    # The exported model is the trained one and transformers reads it.
    hf = transformers.MixtralForCausalLM.from_pretrained(out / "model")
    assert hf.config.num_local_experts == 8 and torch.isfinite(hf.lm_head.weight).all()
    # A second run reuses the corpus and starts the run afresh.
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert "using the corpus already built" in capsys.readouterr().out
