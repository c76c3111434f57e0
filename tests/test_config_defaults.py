"""Config fields a checkpoint leaves out must mean what they mean to transformers (config.json)
and to mistral-inference / transformers' conversion scripts (params.json)."""

import pytest

from smoe.config import ModelConfig

BASE = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96, vocab_size=100)


@pytest.mark.parametrize(
    "d",
    [
        dict(model_type="mistral", num_key_value_heads=2, **BASE),
        dict(model_type="mixtral", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **BASE),
        dict(model_type="mistral", num_key_value_heads=2, sliding_window=None, head_dim=None, **BASE),
    ],
    ids=["mistral-minimal", "mixtral-minimal", "mistral-nulls"],
)
def test_absent_hf_fields_take_transformers_defaults(d):
    import transformers

    ref = transformers.AutoConfig.for_model(**d)
    cfg = ModelConfig.from_hf(d)
    assert cfg.norm_eps == ref.rms_norm_eps
    assert cfg.sliding_window == ref.sliding_window
    assert cfg.max_seq_len == ref.max_position_embeddings
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"]
    assert cfg.head_dim == (getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads)


def test_moe_params_json_without_rope_theta_uses_1e6():
    # mistral-inference: theta = args.rope_theta or 1e6; convert_mixtral_weights_to_hf.py:
    # params.get("rope_theta", 1e6). A dense params.json (Mistral 7B v0.1) keeps 1e4.
    p = {"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 96, "n_heads": 4, "n_kv_heads": 2,
         "norm_eps": 1e-05, "vocab_size": 100, "moe": {"num_experts_per_tok": 2, "num_experts": 8}}  # fmt: skip
    assert ModelConfig.from_params(p).rope_theta == 1e6
    assert ModelConfig.from_params({**p, "rope_theta": None}).rope_theta == 1e6
    dense = {k: v for k, v in p.items() if k != "moe"}
    assert ModelConfig.from_params(dense).rope_theta == 1e4


@pytest.mark.parametrize(
    "bad", [{"norm_eps": None}, {"dim": None}, {"moe": [8, 2]}, {"n_layers": "x"}], ids=str
)
def test_malformed_params_json_is_a_config_error(tmp_path, bad):
    """A null or wrongly typed params.json field must raise ConfigError naming the file (the
    CLI reports ValueErrors as one line), not a bare TypeError/AttributeError traceback."""
    import json

    from smoe.config import ConfigError

    p = {"dim": 64, "n_layers": 2, "hidden_dim": 96, "n_heads": 4, "vocab_size": 100, **bad}
    (tmp_path / "params.json").write_text(json.dumps(p))
    with pytest.raises(ConfigError, match="params.json"):
        ModelConfig.from_file(tmp_path / "params.json")
