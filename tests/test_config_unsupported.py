"""Config files that describe features smoe does not implement are refused, not loaded as a
different model: bias terms, quantised weights, partial or scaled RoPE, YaRN, LoRA, vision."""

from __future__ import annotations

import pytest

from smoe.config import ConfigError, ModelConfig

HF = ModelConfig.preset("tiny").to_hf()
PARAMS = ModelConfig.preset("mixtral-8x7b").to_params()


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"attention_bias": True}, "attention_bias=True is not supported"),
        ({"mlp_bias": True}, "mlp_bias=True is not supported"),
        ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "quantized checkpoints"),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
            "rope_parameters .* is not supported",
        ),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "llama_4_scaling_beta": 0.1}},
            "rope_parameters .* is not supported",
        ),
        # transformers reads rope_parameters where both are given; smoe read rope_theta.
        ({"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, "disagree"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    ],
)
def test_hf_config_with_unsupported_feature_is_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf({**HF, **changes})


def test_hf_config_features_that_are_off_still_load():
    off = {"attention_bias": False, "mlp_bias": False, "quantization_config": None, "rope_theta": None}
    off["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 1.0}
    assert ModelConfig.from_hf({**HF, **off}) == ModelConfig.preset("tiny", rope_theta=5e5)


def test_transformers_rope_parameters_win_as_in_transformers():
    import transformers

    d = {**HF, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    del d["rope_theta"]
    assert transformers.MixtralConfig.from_dict(d).rope_parameters["rope_theta"] == 5e5
    assert ModelConfig.from_hf(d).rope_theta == 5e5


@pytest.mark.parametrize(
    "key,value",
    [
        ("yarn", {"factor": 4.0, "original_max_position_embeddings": 4096}),
        ("rope_scaling", {"type": "linear", "factor": 2.0}),
        ("llama_4_scaling", {"beta": 0.1}),
        ("quantization", {"qformat_weight": "fp8_e4m3"}),
        ("vision_encoder", {"hidden_size": 1024}),
        ("lora", {"rank": 16}),
    ],
)
def test_params_json_with_unsupported_feature_is_refused(key, value):
    with pytest.raises(ConfigError, match=rf"params.json: \['{key}'\] not supported"):
        ModelConfig.from_params({**PARAMS, key: value})
    assert ModelConfig.from_params({**PARAMS, key: None}) == ModelConfig.preset("mixtral-8x7b")


def test_params_json_of_another_model_type_is_refused():
    with pytest.raises(ConfigError, match="model_type must be 'transformer', got 'mamba'"):
        ModelConfig.from_params({**PARAMS, "model_type": "mamba"})


def test_params_json_tied_embeddings_must_be_a_boolean():
    with pytest.raises(ConfigError, match="tied_embeddings must be true or false, got 'no'"):
        ModelConfig.from_params({**PARAMS, "tied_embeddings": "no"})
