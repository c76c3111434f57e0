"""Validation windows: fixed, non-overlapping, spread over the whole val split."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smoe.data.shards import FORMAT, Corpus, CorpusError, write_split
from smoe.train.data import val_batches


def corpus_with_val(path, val_tokens: int) -> Corpus:
    (path / "d").mkdir(parents=True)
    write_split(path / "d", "train", [list(range(3, 50))])
    write_split(path / "d", "val", [[(i % 60000) + 3 for i in range(val_tokens)]])
    manifest = {"format": FORMAT, "vocab_size": 65536, "domains": {"d": {}}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return Corpus(path)


def starts(batches) -> list[int]:
    return [int(row[0]) - 3 for b in batches for row in b.inputs_BT]  # token i holds i + 3


def test_windows_spread_over_the_split_not_its_start(tmp_path):
    corpus = corpus_with_val(tmp_path, 1001)  # 1000 targets: 125 grid windows of 8
    got = starts(val_batches(corpus, "d", seq_len=8, batch_size=2, n_batches=2))
    assert got == [0, 328, 664, 992]  # grid indices 0, 41, 83, 124 (x 8)
    for b in val_batches(corpus, "d", seq_len=8, batch_size=2, n_batches=2):
        assert np.array_equal(b.targets_BT[:, :-1], b.inputs_BT[:, 1:])


def test_none_takes_every_window_and_each_token_once(tmp_path):
    corpus = corpus_with_val(tmp_path, 1001)
    batches = val_batches(corpus, "d", seq_len=8, batch_size=16, n_batches=None)
    assert starts(batches) == list(range(0, 1000, 8))
    assert sum(b.targets_BT.numel() for b in batches) == 1000


def test_too_short_val_split_is_an_error(tmp_path):
    corpus = corpus_with_val(tmp_path, 8)
    with pytest.raises(CorpusError, match="fewer than seq_len"):
        val_batches(corpus, "d", seq_len=8, batch_size=2, n_batches=1)
