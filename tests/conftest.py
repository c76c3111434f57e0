"""Shared fixtures: small checkpoints written by transformers itself (the peer we compare with)."""

from __future__ import annotations

import os

import pytest
import torch

from smoe import cpu_kernels

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread: on the shared 2-core VM, two OpenMP threads contending with other
# processes made small ops (index_add, linear) 10-20x slower, and the tests' shapes are small.
torch.set_num_threads(1)


def hf_mixtral(tmp_path, seed: int = 0, **overrides):
    """Write a random transformers MixtralForCausalLM (or Mistral with num_local_experts=1)
    to ``tmp_path`` and return (directory, transformers model in eval mode)."""
    import transformers

    kw = dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        rope_theta=1e4, sliding_window=None, tie_word_embeddings=False,
    )  # fmt: skip
    kw.update(overrides)
    torch.manual_seed(seed)
    if kw.get("num_local_experts") == 1:
        kw.pop("num_local_experts")
        kw.pop("num_experts_per_tok")
        cfg = transformers.MistralConfig(**kw)
        model = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.MixtralConfig(**kw)
        model = transformers.MixtralForCausalLM(cfg)
    with torch.no_grad():  # transformers initialises norms at 1; randomise them so they are tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.eval()
    model.save_pretrained(tmp_path)
    return tmp_path, model


@pytest.fixture(params=["numba", "torch"])
def decode_engine(request, monkeypatch):
    """The fast step on numba's kernels (smoe.cpu_kernels) or, as without numba, on torch's
    products."""
    if request.param == "torch":
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    elif not cpu_kernels.available():
        pytest.skip("numba is not installed")
    return request.param


@pytest.fixture
def make_hf(tmp_path):
    counter = iter(range(1000))

    def _make(**overrides):
        d = tmp_path / f"hf{next(counter)}"
        return hf_mixtral(d, **overrides)

    return _make


def _sentencepiece_as_tokenizer_json(model_file, specials, path):
    """The SentencePiece model ``model_file`` rebuilt as a Hugging Face ``tokenizer.json`` at
    ``path`` the way transformers converts it (BPE with byte fallback, "▁" normaliser and
    decoder), with ``specials`` as special added tokens. Returns ``path``."""
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers.tokenization_utils_base import generate_merges

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.vocab_size())}
    bpe = models.BPE(vocab=vocab, merges=generate_merges(vocab, scores), unk_token="<unk>", fuse_unk=True,
                     byte_fallback=True)  # fmt: skip
    t = Tokenizer(bpe)
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    t.save(str(path))
    return path


@pytest.fixture(scope="session")
def tokenizer_json():
    """``tokenizer_json(model_file, specials, path)``: see ``_sentencepiece_as_tokenizer_json``."""
    return _sentencepiece_as_tokenizer_json
