"""Token corpora: the offline multi-domain builder, the math generator and the shard reader."""

from smoe.data.build import build_corpus, format_summary
from smoe.data.shards import Corpus, CorpusError

__all__ = ["Corpus", "CorpusError", "build_corpus", "format_summary"]
