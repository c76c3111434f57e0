"""`smoe train` then `smoe export`: transformers loads the trained model with the same logits."""

import torch
import transformers

from smoe.cli.main import main
from smoe.train.export import model_from_run
from test_train_loop import make_corpus


def test_train_export_transformers_logits(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    cfg = tmp_path / "run.json"
    cfg.write_text(
        '{"model": {"preset": "tiny", "vocab_size": 64, "n_layers": 2, "dim": 32, "head_dim": 8,'
        ' "hidden_dim": 48, "max_seq_len": 64}, "train": {"steps": 4, "batch_size": 2, "seq_len": 16,'
        ' "warmup_steps": 1, "eval_batches": 1, "lr": 0.01}}'
    )
    run = tmp_path / "run"
    assert (
        main(["train", "--config", str(cfg), "--data", str(corpus), "--out", str(run), "--no-progress"]) == 0
    )
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    ours = model_from_run(run)
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-5, atol=1e-5)
    # The weights are the trained ones, not the init: training moved the router away from it.
    from smoe.model.transformer import build_model

    fresh = build_model(ours.config, seed=0)
    assert not torch.equal(fresh.layers[0].feed_forward.gate.weight, ours.layers[0].feed_forward.gate.weight)
