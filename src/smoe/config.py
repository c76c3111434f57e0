"""Model configuration: one dataclass, named presets, and conversion to and from the
Hugging Face ``config.json`` (MixtralConfig / MistralConfig) and Mistral ``params.json`` formats.

``num_experts == 1`` means a plain dense SwiGLU feed-forward, as in Mistral 7B.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Dispatch engine names accepted in the config; "auto" picks by device and token count.
DISPATCH_ENGINES = ("auto", "reference", "sorted", "gather", "triton")


class ConfigError(ValueError):
    """An impossible or malformed model configuration."""


# ModelConfig fields that change neither the weights nor their shapes; checkpoint formats do
# not store them, so a loaded model has their defaults.
RUNTIME_FIELDS = ("dispatch", "capacity_factor", "router_jitter")


@dataclass
class ModelConfig:
    dim: int = 4096
    n_layers: int = 32
    head_dim: int = 128
    hidden_dim: int = 14336
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    max_seq_len: int = 32768
    num_experts: int = 8
    top_k: int = 2
    tie_embeddings: bool = False
    # Runtime choices that do not change the weights (RUNTIME_FIELDS; checkpoints do not store them).
    dispatch: str = "auto"
    capacity_factor: float | None = None  # None = dropless
    router_jitter: float = 0.0  # multiplicative noise on the router input while training

    def __post_init__(self) -> None:
        positive = ["dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size"]
        positive += ["max_seq_len", "num_experts", "top_k"]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.head_dim % 2:
            raise ConfigError(
                f"config field 'head_dim' must be even for rotary embeddings, got {self.head_dim}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"config field 'n_heads' ({self.n_heads}) must be divisible by 'n_kv_heads' ({self.n_kv_heads})"
            )
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"config field 'top_k' ({self.top_k}) must not exceed 'num_experts' ({self.num_experts})"
            )
        for name in ("norm_eps", "rope_theta"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"config field {name!r} must be > 0, got {getattr(self, name)!r}")
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool)
            or not isinstance(self.sliding_window, int)
            or self.sliding_window <= 0
        ):
            raise ConfigError(
                f"config field 'sliding_window' must be None or a positive integer, got {self.sliding_window!r}"
            )
        if self.dispatch not in DISPATCH_ENGINES:
            raise ConfigError(
                f"config field 'dispatch' must be one of {DISPATCH_ENGINES}, got {self.dispatch!r}"
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(
                f"config field 'capacity_factor' must be None or > 0, got {self.capacity_factor!r}"
            )
        if not 0.0 <= self.router_jitter < 1.0:
            raise ConfigError(f"config field 'router_jitter' must be in [0, 1), got {self.router_jitter!r}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    def num_params(self, active: bool = False) -> int:
        """Parameter count; ``active=True`` counts only the top_k experts a token uses."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        experts = self.top_k if active else self.num_experts
        ffn = 3 * self.dim * self.hidden_dim * experts + (self.dim * self.num_experts if self.is_moe else 0)
        per_layer = attn + ffn + 2 * self.dim
        embed = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + embed + self.dim

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type not in ("mixtral", "mistral"):
            raise ConfigError(f"{source}: model_type must be 'mixtral' or 'mistral', got {model_type!r}")

        def whole(key: str, default: int | None = None) -> int:
            """hf[key] as an int; a null or absent optional field takes ``default``. 2.7 or
            "32" fail rather than turn into 2 or a string."""
            v = hf[key] if default is None else hf.get(key)
            if v is None and default is not None:
                return default
            if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
                raise ConfigError(f"{source}: {key} must be a whole number, got {v!r}")
            return int(v)

        try:
            dim, n_heads = whole("hidden_size"), whole("num_attention_heads")
            rope = hf.get("rope_parameters") or {}
            # transformers 5 writes rope_parameters only, v4 a top-level rope_theta; where both
            # are given transformers reads rope_parameters, so a disagreement is refused rather
            # than settled differently here.
            thetas = {float(t) for t in (hf.get("rope_theta"), rope.get("rope_theta")) if t is not None}
            if len(thetas) > 1:
                raise ConfigError(
                    f"{source}: rope_theta ({hf['rope_theta']}) and rope_parameters.rope_theta "
                    f"({rope['rope_theta']}) disagree"
                )
            rope_theta = thetas.pop() if thetas else (1e6 if model_type == "mixtral" else 1e4)
            # transformers 5 writes rope_parameters; v4 configs (e.g. YaRN Mistrals) say
            # rope_scaling, with "type" or "rope_type". Any scaling changes every position's
            # rotation, so loading it as plain RoPE would give a different model.
            legacy = hf.get("rope_scaling") or {}
            for field, params in (("rope_parameters", rope), ("rope_scaling", legacy)):
                kind = params.get("rope_type", params.get("type", "default"))
                if kind != "default":
                    raise ConfigError(f"{source}: {field} of type {kind!r} is not supported (only 'default')")
                extra = sorted(set(params) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
                if extra or float(params.get("partial_rotary_factor") or 1.0) != 1.0:
                    raise ConfigError(
                        f"{source}: {field} {params} is not supported (only plain RoPE over the whole head)"
                    )
            _refuse_unsupported_hf(hf, source)
            act = hf.get("hidden_act", "silu")
            if act != "silu":
                raise ConfigError(f"{source}: hidden_act must be 'silu', got {act!r}")
            moe = model_type == "mixtral"
            # An absent field takes the default of transformers' MixtralConfig / MistralConfig,
            # so that a config.json means the same model to both libraries. (Not for
            # num_key_value_heads, whose default of 8 there suits few shapes; a wrong count
            # fails on the k_proj shape rather than loading a different model.)
            return cls(
                dim=dim,
                n_layers=whole("num_hidden_layers"),
                head_dim=whole("head_dim", dim // n_heads),
                hidden_dim=whole("intermediate_size"),
                n_heads=n_heads,
                n_kv_heads=whole("num_key_value_heads", n_heads),
                vocab_size=whole("vocab_size"),
                norm_eps=float(hf.get("rms_norm_eps", 1e-5 if moe else 1e-6)),
                rope_theta=float(rope_theta),
                sliding_window=hf.get("sliding_window", None if moe else 4096),
                max_seq_len=whole("max_position_embeddings", 131072),
                num_experts=whole("num_local_experts") if moe else 1,
                top_k=whole("num_experts_per_tok") if moe else 1,
                tie_embeddings=_flag(hf.get("tie_word_embeddings", False), "tie_word_embeddings"),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing required field {e.args[0]!r}") from None
        except ConfigError as e:  # its own message, not "wrong type"
            raise ConfigError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None
        except (TypeError, ValueError) as e:  # e.g. "rms_norm_eps": null
            raise ConfigError(f"{source}: a field has the wrong type ({e})") from None

    def to_hf(self) -> dict[str, Any]:
        hf: dict[str, Any] = {
            "architectures": ["MixtralForCausalLM" if self.is_moe else "MistralForCausalLM"],
            "model_type": "mixtral" if self.is_moe else "mistral",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_seq_len,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "attention_dropout": 0.0,
            "torch_dtype": "float32",
        }
        if self.is_moe:
            hf.update(num_local_experts=self.num_experts, num_experts_per_tok=self.top_k)
            hf.update(router_aux_loss_coef=0.02, output_router_logits=False, router_jitter_noise=0.0)
        return hf

    # ------------------------------------------------------------------ Mistral params.json
    @classmethod
    def from_params(cls, p: dict[str, Any], source: str = "params.json") -> ModelConfig:
        try:
            unsupported = sorted(k for k in _UNSUPPORTED_PARAMS if p.get(k))
            if unsupported:
                raise ConfigError(
                    f"{unsupported} not supported (they change the model; loading without "
                    f"them would give different outputs)"
                )
            if p.get("model_type", "transformer") != "transformer":
                raise ConfigError(f"model_type must be 'transformer', got {p['model_type']!r}")
            moe = p.get("moe") or {}
            dim, n_heads = int(p["dim"]), int(p["n_heads"])
            return cls(
                dim=dim,
                n_layers=int(p["n_layers"]),
                head_dim=int(p.get("head_dim") or dim // n_heads),
                hidden_dim=int(p["hidden_dim"]),
                n_heads=n_heads,
                n_kv_heads=int(p.get("n_kv_heads") or n_heads),
                vocab_size=int(p["vocab_size"]),
                norm_eps=float(p.get("norm_eps", 1e-5)),
                # Absent: 1e6 for a MoE, as mistral-inference and transformers'
                # convert_mixtral_weights_to_hf.py assume; 1e4 for a dense Mistral 7B v0.1
                # (convert_mistral_weights_to_hf.py).
                rope_theta=float(p.get("rope_theta") or (1e6 if int(moe.get("num_experts", 1)) > 1 else 1e4)),
                sliding_window=p.get("sliding_window"),
                max_seq_len=int(p.get("max_seq_len", p.get("max_position_embeddings", 32768))),
                num_experts=int(moe.get("num_experts", 1)),
                top_k=int(moe.get("num_experts_per_tok", 1)),
                tie_embeddings=_flag(p.get("tied_embeddings", False), "tied_embeddings"),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing required field {e.args[0]!r}") from None
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (TypeError, ValueError, AttributeError) as e:  # e.g. "norm_eps": null, "moe": [8, 2]
            raise ConfigError(f"{source}: a field has the wrong type ({e})") from None

    def to_params(self) -> dict[str, Any]:
        p: dict[str, Any] = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "max_seq_len": self.max_seq_len,
        }
        if self.sliding_window is not None:
            p["sliding_window"] = self.sliding_window
        if self.is_moe:
            p["moe"] = {"num_experts": self.num_experts, "num_experts_per_tok": self.top_k}
        if self.tie_embeddings:
            p["tied_embeddings"] = True
        return p

    # ------------------------------------------------------------------ files
    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` (HF), ``params.json`` (Mistral) or a smoe config JSON."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
        if "model_type" in d:
            return cls.from_hf(d, str(path))
        if "num_experts" in d or "top_k" in d:  # smoe's own to_dict() layout
            try:
                return cls.from_dict(d)
            except TypeError as e:
                raise ConfigError(f"{path}: {e}") from None
        return cls.from_params(d, str(path))


def _flag(value: Any, key: str) -> bool:
    """A JSON boolean; "false" or 0 would otherwise turn into True or pass unnoticed."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _refuse_unsupported_hf(hf: dict[str, Any], source: str) -> None:
    """Refuse config.json features smoe does not implement: ignoring them would load a model
    whose outputs differ from the checkpoint's (bias terms, quantised weights)."""
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConfigError(
                f"{source}: {key}={hf[key]!r} is not supported (smoe's projections have no bias)"
            )
    if hf.get("quantization_config"):
        method = (
            hf["quantization_config"].get("quant_method", "?")
            if isinstance(hf["quantization_config"], dict)
            else "?"
        )
        raise ConfigError(
            f"{source}: quantized checkpoints (quantization_config, {method!r}) are not supported"
        )


# params.json keys of Mistral releases whose features smoe does not implement (YaRN and Llama-4
# attention scaling change the rotation/attention, quantized weights, vision encoders, LoRA).
_UNSUPPORTED_PARAMS = ("yarn", "rope_scaling", "llama_4_scaling", "quantization", "vision_encoder", "lora")


PRESETS: dict[str, dict[str, Any]] = {
    # Mixtral paper, Table 1.
    "mixtral-8x7b": dict(
        dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
        vocab_size=32000, norm_eps=1e-5, rope_theta=1e6, sliding_window=None, max_seq_len=32768,
        num_experts=8, top_k=2,
    ),
    # Mixtral-8x22B-v0.1 release config (vocabulary v3 of 32768 tokens, 64k context).
    "mixtral-8x22b": dict(
        dim=6144, n_layers=56, head_dim=128, hidden_dim=16384, n_heads=48, n_kv_heads=8,
        vocab_size=32768, norm_eps=1e-5, rope_theta=1e6, sliding_window=None, max_seq_len=65536,
        num_experts=8, top_k=2,
    ),
    # Mistral-7B-v0.1: dense, sliding window 4096.
    "mistral-7b": dict(
        dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
        vocab_size=32000, norm_eps=1e-5, rope_theta=1e4, sliding_window=4096, max_seq_len=32768,
        num_experts=1, top_k=1,
    ),
    # CPU-sized presets on the real 32000-token vocabulary.
    "tiny": dict(
        dim=128, n_layers=4, head_dim=32, hidden_dim=352, n_heads=4, n_kv_heads=2,
        vocab_size=32000, rope_theta=1e4, max_seq_len=1024, num_experts=8, top_k=2,
    ),
    "small": dict(
        dim=256, n_layers=4, head_dim=64, hidden_dim=704, n_heads=4, n_kv_heads=2,
        vocab_size=32000, rope_theta=1e4, max_seq_len=2048, num_experts=8, top_k=2,
    ),
    "tiny-dense": dict(
        dim=128, n_layers=4, head_dim=32, hidden_dim=352, n_heads=4, n_kv_heads=2,
        vocab_size=32000, rope_theta=1e4, max_seq_len=1024, num_experts=1, top_k=1,
    ),
}  # fmt: skip
