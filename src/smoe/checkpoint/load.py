"""Load and save whole models.

Loading builds the model on the meta device, then assigns each parameter from the weight files
(safetensors read tensor by tensor with positioned reads, ``os.preadv``, see files.py; pickles
memory-mapped by ``torch.load``), converted to the target dtype and experts stacked, so peak
memory is about one copy of the weights. Loading is strict: every parameter must come from the
file with the shape the config implies, and every tensor in the file must be used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from smoe.checkpoint.files import CheckpointError, TensorSource, consolidated_weight_files, hf_weight_files
from smoe.checkpoint.keymap import HEAD_KEYS, IGNORED_SUFFIXES, Recipe, consolidated_recipes, hf_recipes
from smoe.checkpoint.layout import check_config_replaceable, check_no_other_layout, remove_stale
from smoe.config import ConfigError, ModelConfig
from smoe.model.transformer import Transformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DTYPES |= {"float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    return DTYPES[dtype]


def detect_format(directory: Path) -> str:
    if (directory / "config.json").is_file():
        return "hf"
    if (directory / "params.json").is_file():
        return "consolidated"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory does not exist")
    raise CheckpointError(f"{directory}: neither config.json (Hugging Face) nor params.json (Mistral) found")


def load_config(path: str | Path) -> ModelConfig:
    directory = Path(path)
    name = "config.json" if detect_format(directory) == "hf" else "params.json"
    return ModelConfig.from_file(directory / name)


def _materialise(
    src: TensorSource,
    recipes: dict[str, Recipe],
    model: Transformer,
    dtype: torch.dtype,
    device: str,
    tied_head: str | None = None,
) -> dict[str, torch.Tensor]:
    """``tied_head``: the output-projection key of this layout when the config ties it to the
    embedding; the file may still hold it, and then it must equal the embedding."""
    expected = dict(model.state_dict(keep_vars=True).items())
    missing = [k for r in recipes.values() for k in r.keys if k not in src.keys()]
    if missing:
        raise CheckpointError(
            f"{src.files[0].parent}: {len(missing)} missing key(s), first {missing[0]!r} "
            f"(config says {model.config.n_layers} layers, {model.config.num_experts} experts)"
        )
    used = {k for r in recipes.values() for k in r.keys}
    if tied_head in src.keys():
        _check_tied_head(src, tied_head, recipes["tok_embeddings.weight"].keys[0])
        used.add(tied_head)
    unexpected = sorted(k for k in src.keys() - used if not k.endswith(IGNORED_SUFFIXES))
    if unexpected:
        raise CheckpointError(
            f"{src.file_of(unexpected[0])}: unexpected key {unexpected[0]!r} (+{len(unexpected) - 1} more)"
        )
    out: dict[str, torch.Tensor] = {}
    for name, recipe in tqdm(
        recipes.items(), desc="loading", unit="tensor", leave=False, disable=len(recipes) < 200
    ):
        want = tuple(expected[name].shape)
        per_key = recipe.stored_shape(want)
        for k in recipe.keys:
            if not src.dtype(k).is_floating_point:
                # Every parameter is floating point; converting integer bytes would load
                # numbers that were never weights.
                raise CheckpointError(
                    f"{src.file_of(k)}: tensor {k!r} is stored as {src.dtype(k)}, expected a "
                    "floating-point dtype (float32, bfloat16, float16)"
                )
            if src.shape(k) != per_key:
                raise CheckpointError(
                    f"{src.file_of(k)}: tensor {k!r} has shape {src.shape(k)} but the config implies {per_key}"
                )
        if recipe.stacked and device == "cpu" and all(src.dtype(k) == dtype for k in recipe.keys):
            # Read each expert straight into its slice of the stacked tensor: no second copy.
            stacked = torch.empty(want, dtype=dtype)
            for e, k in enumerate(recipe.keys):
                src.get(k, out=stacked[e])
            out[name] = stacked
            continue
        parts = [src.get(k).to(device=device, dtype=dtype) for k in recipe.keys]
        out[name] = recipe.to_smoe(parts).contiguous()
        del parts
    return out


def _check_tied_head(src: TensorSource, head: str, embed: str) -> None:
    # Some hub checkpoints with tied embeddings also store the output projection. smoe ties it
    # to the embedding, so it may be dropped only when it is the embedding; otherwise the
    # loaded model would silently differ from what the file says.
    a, b = src.get(head), src.get(embed)
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
        raise CheckpointError(
            f"{src.file_of(head)}: the config ties the output projection to the embedding, but "
            f"{head!r} differs from {embed!r}; untie the embeddings in the config to load it"
        )
    del a, b


def load_model(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    dispatch: str | None = None,
) -> Transformer:
    """Load a Hugging Face (``config.json``) or Mistral consolidated (``params.json``) directory.

    ``dtype=None`` keeps float32 unless the checkpoint says bfloat16/float16 (config.json's
    dtype; for params.json, which has none, the dtype all its weight tensors share).
    """
    directory = Path(path)
    fmt = detect_format(directory)
    try:
        cfg = load_config(directory)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if dispatch is not None:
        cfg = cfg.replace(dispatch=dispatch)
    src = TensorSource(hf_weight_files(directory) if fmt == "hf" else consolidated_weight_files(directory))
    recipes = hf_recipes(cfg) if fmt == "hf" else consolidated_recipes(cfg, src.keys())
    tied_head = HEAD_KEYS[fmt] if cfg.tie_embeddings else None
    target = parse_dtype(dtype) or _checkpoint_dtype(directory, fmt, src)
    with torch.device("meta"):
        model = Transformer(cfg)
    state = _materialise(src, recipes, model, target, str(device), tied_head)
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def _checkpoint_dtype(directory: Path, fmt: str, src: TensorSource) -> torch.dtype:
    if fmt != "hf":
        # Mistral's consolidated releases are bfloat16 and params.json names no dtype: load
        # them as stored, as the Hugging Face copy of the same model loads, not at twice the size.
        stored = {d for d in map(src.dtype, src.keys()) if d.is_floating_point}
        return (
            stored.pop() if len(stored) == 1 and stored <= {torch.bfloat16, torch.float16} else torch.float32
        )
    d = json.loads((directory / "config.json").read_text())
    name = d.get("dtype") or d.get("torch_dtype") or "float32"
    return DTYPES.get(name, torch.float32)


def save_model(
    model: Transformer, path: str | Path, fmt: str = "hf", max_shard_bytes: int = 5 * 2**30
) -> Path:
    """Write a Hugging Face directory (``fmt="hf"``, loadable by transformers) or a Mistral
    consolidated one (``fmt="consolidated"``). HF checkpoints larger than ``max_shard_bytes``
    are sharded with an index, as the hub does.

    Saving into a directory replaces the checkpoint of the same layout there completely (its
    weight files that this save does not write are removed); a directory holding the other
    layout, or a config file of the layout's name that is not a model config (a training run's
    config.json), is refused with a ``CheckpointError`` and left as it was."""
    if fmt not in ("hf", "consolidated"):
        raise ValueError(f"unknown checkpoint format {fmt!r}; use 'hf' or 'consolidated'")
    cfg, directory = model.config, Path(path)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(
            f"{directory}: exists and is not a directory; a checkpoint is saved as a directory"
        )
    if directory.is_dir():
        check_no_other_layout(directory, fmt)
        check_config_replaceable(directory, fmt)
    directory.mkdir(parents=True, exist_ok=True)
    recipes = hf_recipes(cfg) if fmt == "hf" else consolidated_recipes(cfg)
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for name, recipe in recipes.items():
        for key, t in zip(recipe.keys, recipe.from_smoe(state[name].detach())):
            tensors[key] = t.contiguous().cpu()
    dtype = next(iter(tensors.values())).dtype
    if fmt == "consolidated":
        _write_json(directory / "params.json", cfg.to_params())
        _write_safetensors(tensors, directory / "consolidated.safetensors")
        remove_stale(directory, fmt, {"consolidated.safetensors"})
        return directory
    hf = cfg.to_hf()
    hf["torch_dtype"] = hf["dtype"] = str(dtype).removeprefix("torch.")
    _write_json(directory / "config.json", hf)
    _write_json(directory / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        _write_safetensors(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        remove_stale(directory, fmt, {"model.safetensors"})
        return directory
    weight_map, total = {}, 0
    for i, shard in enumerate(tqdm(shards, desc="saving shards", leave=False)):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(shard, directory / name, metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    _write_json(
        directory / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )
    remove_stale(directory, fmt, {"model.safetensors.index.json", *weight_map.values()})
    return directory


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    # Write beside, then rename: a crash mid-write never leaves a truncated file under the
    # real name, where it would replace the previous good checkpoint.
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
