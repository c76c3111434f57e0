"""Config validation, presets, and conversion to and from the HF and Mistral formats."""

from __future__ import annotations

import json

import pytest

from smoe.config import PRESETS, ConfigError, ModelConfig


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(top_k=3, num_experts=2), r"'top_k' \(3\) must not exceed 'num_experts' \(2\)"),
        (dict(n_heads=6, n_kv_heads=4), r"'n_heads' \(6\) must be divisible by 'n_kv_heads' \(4\)"),
        (dict(dim=0), r"'dim' must be a positive integer, got 0"),
        (dict(hidden_dim=-5), r"'hidden_dim' must be a positive integer"),
        (dict(n_layers=2.5), r"'n_layers' must be a positive integer"),
        (dict(head_dim=7), r"'head_dim' must be even"),
        (dict(sliding_window=0), r"'sliding_window' must be None or a positive integer"),
        (dict(norm_eps=0.0), r"'norm_eps' must be > 0"),
        (dict(dispatch="fast"), r"'dispatch' must be one of"),
        (dict(capacity_factor=0), r"'capacity_factor' must be None or > 0"),
    ],
)
def test_invalid_values_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.preset("tiny", **change)


def test_mixtral_8x7b_matches_paper():
    cfg = ModelConfig.preset("mixtral-8x7b")
    assert (cfg.dim, cfg.n_layers, cfg.head_dim, cfg.hidden_dim) == (4096, 32, 128, 14336)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.max_seq_len, cfg.vocab_size) == (32, 8, 32768, 32000)
    assert (cfg.num_experts, cfg.top_k, cfg.rope_theta, cfg.sliding_window) == (8, 2, 1e6, None)
    # Paper: 46.7B parameters, 12.9B active per token.
    assert round(cfg.num_params() / 1e9, 1) == 46.7
    assert round(cfg.num_params(active=True) / 1e9, 1) == 12.9


def test_mistral_7b_is_dense_with_window():
    cfg = ModelConfig.preset("mistral-7b")
    assert not cfg.is_moe and cfg.sliding_window == 4096
    assert round(cfg.num_params() / 1e9, 2) == 7.24


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        ModelConfig.preset("nope")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_roundtrips(name, tmp_path):
    cfg = ModelConfig.preset(name)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    assert ModelConfig.from_params(cfg.to_params()) == cfg
    (tmp_path / "smoe.json").write_text(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_file(tmp_path / "smoe.json") == cfg


def test_reads_transformers_configs():
    import transformers

    hf = transformers.MixtralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                    num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2, vocab_size=100,
                                    rope_theta=1e6, sliding_window=None)  # fmt: skip
    cfg = ModelConfig.from_hf(hf.to_dict())
    assert (cfg.dim, cfg.head_dim, cfg.n_kv_heads, cfg.num_experts, cfg.top_k) == (64, 16, 2, 8, 2)
    assert cfg.rope_theta == 1e6
    mis = transformers.MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, sliding_window=32,
                                     intermediate_size=96, num_hidden_layers=2, vocab_size=100)  # fmt: skip
    cfg = ModelConfig.from_hf(mis.to_dict())
    assert (cfg.num_experts, cfg.top_k, cfg.sliding_window, cfg.n_kv_heads) == (1, 1, 32, 1)


def test_params_json_of_mixtral_release():
    # The params.json shipped with Mixtral-8x7B's consolidated release.
    p = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
         "norm_eps": 1e-05, "vocab_size": 32000, "moe": {"num_experts_per_tok": 2, "num_experts": 8}, "rope_theta": 1e6}  # fmt: skip
    cfg = ModelConfig.from_params(p)
    assert cfg == ModelConfig.preset("mixtral-8x7b", max_seq_len=32768)


def test_hf_config_errors():
    with pytest.raises(ConfigError, match="model_type must be 'mixtral' or 'mistral', got 'llama'"):
        ModelConfig.from_hf({"model_type": "llama"})
    with pytest.raises(ConfigError, match="missing required field 'num_local_experts'"):
        ModelConfig.from_hf({"model_type": "mixtral", "hidden_size": 8, "num_attention_heads": 2,
                             "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 10})  # fmt: skip


def _mistral(**changes) -> dict:
    base = {"model_type": "mistral", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1,
            "intermediate_size": 8, "vocab_size": 10}  # fmt: skip
    return {**base, **changes}


@pytest.mark.parametrize(
    "scaling",
    [{"type": "yarn", "factor": 16.0}, {"rope_type": "linear", "factor": 2.0}],
    ids=["v4-type", "rope_type"],
)
def test_legacy_rope_scaling_is_refused(scaling):
    """A transformers-v4 config (e.g. a YaRN Mistral) says rope_scaling; it must not load as
    plain RoPE."""
    with pytest.raises(
        ConfigError, match=f"rope_scaling of type '{scaling.get('type', scaling.get('rope_type'))}'"
    ):
        ModelConfig.from_hf(_mistral(rope_scaling=scaling))
    assert ModelConfig.from_hf(_mistral(rope_scaling=None)).n_layers == 1


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"num_hidden_layers": None}, "num_hidden_layers must be a whole number, got None"),
        ({"num_hidden_layers": 2.7}, "num_hidden_layers must be a whole number, got 2.7"),
        ({"vocab_size": "10"}, "vocab_size must be a whole number, got '10'"),
        ({"rms_norm_eps": None}, "a field has the wrong type"),
    ],
)
def test_hf_config_types(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(_mistral(**changes))
    assert ModelConfig.from_hf(_mistral(num_hidden_layers=2.0, head_dim=None)).n_layers == 2
