"""Saving into a directory that already holds a checkpoint: the new checkpoint replaces the old
one completely (smoe and transformers both load the new weights), and a directory holding the
other layout is refused without losing a file."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

import smoe
from smoe import CheckpointError
from smoe.config import ModelConfig

CFG = ModelConfig(
    dim=32, n_layers=2, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, vocab_size=97,
    max_seq_len=64, num_experts=4, top_k=2,
)  # fmt: skip
SMALL_SHARDS = 20_000  # bytes: about 7 shards for CFG in float32


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def models():
    return smoe.build_model(CFG, seed=1), smoe.build_model(CFG, seed=2)


def _transformers_embedding(directory) -> torch.Tensor:
    import transformers

    return transformers.MixtralForCausalLM.from_pretrained(directory).model.embed_tokens.weight


def test_single_file_replaces_shards(models, tmp_path):
    old, new = models
    smoe.save_model(old, tmp_path, max_shard_bytes=SMALL_SHARDS)
    smoe.save_model(new, tmp_path)
    assert _names(tmp_path) == ["config.json", "generation_config.json", "model.safetensors"]
    assert _same(smoe.load_model(tmp_path), new)
    assert torch.equal(_transformers_embedding(tmp_path), new.tok_embeddings.weight)


def test_shards_replace_single_file_and_more_shards(models, tmp_path):
    old, new = models
    smoe.save_model(old, tmp_path)
    smoe.save_model(old, tmp_path, max_shard_bytes=SMALL_SHARDS // 2)
    assert not (tmp_path / "model.safetensors").exists()
    n_before = len(list(tmp_path.glob("model-*-of-*.safetensors")))
    smoe.save_model(new, tmp_path, max_shard_bytes=SMALL_SHARDS)
    shards = list(tmp_path.glob("model-*-of-*.safetensors"))
    assert 1 < len(shards) < n_before
    total = len(shards)
    assert all(p.name.endswith(f"-of-{total:05d}.safetensors") for p in shards)
    assert _same(smoe.load_model(tmp_path), new)
    assert torch.equal(_transformers_embedding(tmp_path), new.tok_embeddings.weight)


def test_single_file_wins_over_index_like_transformers(models, tmp_path):
    """A directory holding both (from a crash, or copied by hand): load what transformers loads."""
    old, new = models
    smoe.save_model(old, tmp_path / "both", max_shard_bytes=SMALL_SHARDS)
    smoe.save_model(new, tmp_path / "single")
    shutil.copy(tmp_path / "single" / "model.safetensors", tmp_path / "both")
    assert torch.equal(_transformers_embedding(tmp_path / "both"), new.tok_embeddings.weight)
    assert _same(smoe.load_model(tmp_path / "both"), new)


def test_consolidated_replaces_other_consolidated_files(models, tmp_path):
    old, new = models
    smoe.save_model(old, tmp_path, fmt="consolidated")
    # An older multi-file consolidated checkpoint of the same layout, in the same directory.
    (tmp_path / "consolidated.safetensors").rename(tmp_path / "consolidated-00001-of-00001.safetensors")
    torch.save({}, tmp_path / "consolidated.00.pth")
    smoe.save_model(new, tmp_path, fmt="consolidated")
    assert _names(tmp_path) == ["consolidated.safetensors", "params.json"]
    assert _same(smoe.load_model(tmp_path), new)


@pytest.mark.parametrize(("first", "second"), [("hf", "consolidated"), ("consolidated", "hf")])
def test_other_layout_is_refused_and_kept(models, tmp_path, first, second):
    old, new = models
    smoe.save_model(old, tmp_path, fmt=first)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    found = "config.json, model.safetensors" if first == "hf" else "consolidated.safetensors, params.json"
    with pytest.raises(
        CheckpointError,
        match=rf"{re.escape(str(tmp_path))}: cannot save a '{second}' checkpoint.*\({found}\)",
    ):
        smoe.save_model(new, tmp_path, fmt=second)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert _same(smoe.load_model(tmp_path), old)


def test_save_into_new_or_unrelated_directory(models, tmp_path):
    """Files of neither layout (tokenizer, notes) are left where they are."""
    _, new = models
    (tmp_path / "tokenizer.model").write_bytes(b"spm")
    smoe.save_model(new, tmp_path / "fresh" / "nested")
    smoe.save_model(new, tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == b"spm"
    assert _same(smoe.load_model(tmp_path), new)
    assert _same(smoe.load_model(tmp_path / "fresh" / "nested"), new)


def test_save_onto_a_file_is_refused(tmp_path):
    from smoe.checkpoint.files import CheckpointError

    target = tmp_path / "afile"
    target.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        smoe.save_model(smoe.build_model(ModelConfig.preset("tiny").replace(n_layers=1), seed=0), target)
    assert target.read_text() == "not a checkpoint"


@pytest.mark.parametrize("fmt,name", [("hf", "config.json"), ("consolidated", "params.json")])
@pytest.mark.parametrize("content", ['{"model": {"dim": 32}, "train": {"steps": 10}}', "not json", "[]"])
def test_a_config_file_that_is_not_a_model_config_is_not_overwritten(models, tmp_path, fmt, name, content):
    """`smoe export --out RUN` into a training run would have replaced the run's config.json
    (what --resume reads) with the model's; any config.json / params.json that is not a model
    config of the layout stops the save, and the directory is left as it was."""
    a, _ = models
    (tmp_path / name).write_text(content)
    before = _names(tmp_path)
    with pytest.raises(CheckpointError, match="not a .* model config"):
        smoe.save_model(a, tmp_path, fmt=fmt)
    assert (tmp_path / name).read_text() == content and _names(tmp_path) == before


@pytest.mark.parametrize("fmt", ["hf", "consolidated"])
def test_saving_over_a_checkpoint_of_the_same_layout_still_works(models, tmp_path, fmt):
    a, b = models
    smoe.save_model(a, tmp_path, fmt=fmt)
    smoe.save_model(b, tmp_path, fmt=fmt)
    assert _same(smoe.load_model(tmp_path), b)
