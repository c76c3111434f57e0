"""Every malformed checkpoint fails with one clear error that names the file and key."""

from __future__ import annotations

import json
import pickle
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import smoe
from smoe import CheckpointError


@pytest.fixture
def hf_dir(make_hf):
    directory, _ = make_hf()
    return directory


def _rewrite(directory, fn):
    path = directory / "model.safetensors"
    sd = load_file(path)
    fn(sd)
    save_file(sd, path)


def test_missing_key(hf_dir):
    _rewrite(hf_dir, lambda sd: sd.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    with pytest.raises(CheckpointError, match=r"missing key.*layers\.1\.block_sparse_moe\.experts\.3\.w2"):
        smoe.load_model(hf_dir)


def test_unexpected_key(hf_dir):
    _rewrite(hf_dir, lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors.*unexpected key 'model\.layers\.0\.extra\.weight'"
    ):
        smoe.load_model(hf_dir)


def test_shape_mismatch(hf_dir):
    _rewrite(hf_dir, lambda sd: sd.__setitem__("model.layers.0.self_attn.q_proj.weight", torch.zeros(32, 31)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*q_proj\.weight.*\(32, 31\).*\(32, 32\)"):
        smoe.load_model(hf_dir)


def test_config_disagrees_with_weights(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"w1\.weight' has shape \(48, 32\) but the config implies \(64, 32\)"
    ):
        smoe.load_model(hf_dir)


def test_config_with_more_layers_than_weights(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing key.*model\.layers\.2\..*3 layers"):
        smoe.load_model(hf_dir)


def test_truncated_file(hf_dir):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        smoe.load_model(hf_dir)


def test_not_a_safetensors_file(hf_dir):
    (hf_dir / "model.safetensors").write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        smoe.load_model(hf_dir)


def test_missing_shard(hf_dir, tmp_path):
    model = smoe.load_model(hf_dir)
    smoe.save_model(model, tmp_path / "sh", max_shard_bytes=20_000)
    next((tmp_path / "sh").glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-\d+\.safetensors: weight file is missing"):
        smoe.load_model(tmp_path / "sh")


def test_no_weights_and_no_config(hf_dir, tmp_path):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        smoe.load_model(hf_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither config.json"):
        smoe.load_model(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        smoe.load_model(tmp_path / "nowhere")


def test_bad_config_json(hf_dir):
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: cannot read config"):
        smoe.load_model(hf_dir)


def test_impossible_config_in_checkpoint(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["num_experts_per_tok"] = 9
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'top_k' \(9\) must not exceed 'num_experts' \(4\)"):
        smoe.load_model(hf_dir)


def test_pickle_with_code_is_refused(hf_dir, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    out = tmp_path / "evil"
    shutil.copytree(hf_dir, out)
    (out / "model.safetensors").unlink()
    with open(out / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(
        CheckpointError, match=r"pytorch_model\.bin: cannot be read with torch\.load\(weights_only=True\)"
    ):
        smoe.load_model(out)


def test_integer_dtype_for_float_parameter(hf_dir):
    # Same bytes, declared as I32: loading would turn float bits into large integers.
    _rewrite(
        hf_dir, lambda sd: sd.__setitem__("model.norm.weight", sd["model.norm.weight"].view(torch.int32))
    )
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight' is stored as torch\.int32"
    ):
        smoe.load_model(hf_dir)


def _edit_header(path, fn):
    """Rewrite a safetensors header in place, keeping the data bytes as they are."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    fn(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


def test_overlapping_tensors(hf_dir):
    # Two norms of the same shape pointing at the same bytes (the other bytes become unused).
    def alias(h):
        h["model.layers.0.input_layernorm.weight"]["data_offsets"] = list(
            h["model.layers.0.post_attention_layernorm.weight"]["data_offsets"]
        )

    _edit_header(hf_dir / "model.safetensors", alias)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: not a readable safetensors file \(tensors .*layers\.0\..*layernorm.* overlap",
    ):
        smoe.load_model(hf_dir)


def test_tied_embeddings_with_equal_head_in_file(make_hf):
    directory, ref = make_hf(tie_word_embeddings=True)
    _rewrite(directory, lambda sd: sd.__setitem__("lm_head.weight", sd["model.embed_tokens.weight"].clone()))
    model = smoe.load_model(directory)
    assert model.output.weight is model.tok_embeddings.weight
    tokens = torch.arange(12)[None] % 97
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens).logits, atol=1e-5, rtol=0)


def test_tied_embeddings_with_different_head_in_file(make_hf):
    directory, _ = make_hf(tie_word_embeddings=True)
    _rewrite(directory, lambda sd: sd.__setitem__("lm_head.weight", sd["model.embed_tokens.weight"] + 1))
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: the config ties .*'lm_head\.weight' differs from 'model\.embed_tokens\.weight'",
    ):
        smoe.load_model(directory)


def test_tied_embeddings_consolidated_head(tmp_path):
    cfg = smoe.ModelConfig.preset("tiny", n_layers=1, tie_embeddings=True)
    model = smoe.build_model(cfg, seed=0)
    smoe.save_model(model, tmp_path, fmt="consolidated")
    path = tmp_path / "consolidated.safetensors"
    sd = load_file(path)
    save_file(sd | {"output.weight": sd["tok_embeddings.weight"].clone()}, path)
    assert torch.equal(smoe.load_model(tmp_path).output.weight, model.tok_embeddings.weight)
    save_file(sd | {"output.weight": sd["tok_embeddings.weight"].flip(0)}, path)
    with pytest.raises(CheckpointError, match=r"'output\.weight' differs from 'tok_embeddings\.weight'"):
        smoe.load_model(tmp_path)
