"""A checkpoint directory as Mistral's own downloads lay it out names its SentencePiece file by
version (tokenizer.model.v3 for Mixtral-8x22B); its ids differ from v1's, so load_tokenizer
must use it, not silently fall back to the default v1 tokenizer."""

import shutil

import pytest

from smoe.tokenizer import default_tokenizer_path, load_tokenizer

V3 = default_tokenizer_path().parent / "mistral_instruct_tokenizer_240323.model.v3"


@pytest.mark.skipif(not V3.is_file(), reason="mistral-common without the v3 tokenizer")
def test_versioned_tokenizer_in_checkpoint_dir(tmp_path):
    shutil.copy(V3, tmp_path / "tokenizer.model.v3")
    (tmp_path / "params.json").write_text("{}")
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 32768
    assert tok.encode("Hello world") == load_tokenizer(V3).encode("Hello world")
    assert tok.encode("Hello world") != load_tokenizer().encode("Hello world")


def test_tekken_only_dir_is_refused(tmp_path):
    (tmp_path / "tekken.json").write_text("{}")
    with pytest.raises(ValueError, match="Tekken"):
        load_tokenizer(tmp_path)
