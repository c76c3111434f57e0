"""Routing analysis (the Mixtral paper, section 5): record each token's experts over a corpus,
accumulate statistics streaming, and write routing.json, PNG plots and a self-contained report.html.

    from smoe.analysis import run_analysis
    summary = run_analysis(model, tokenizer, {"code": docs, "prose": docs}, "runs/report")
"""

from smoe.analysis.record import RecordWriter, load_records, route_documents, windows
from smoe.analysis.run import load_domain_records, run_analysis
from smoe.analysis.stats import DomainStats, TokenExpertCounts, chance_any, chance_first

__all__ = [
    "DomainStats",
    "RecordWriter",
    "TokenExpertCounts",
    "chance_any",
    "chance_first",
    "load_domain_records",
    "load_records",
    "route_documents",
    "run_analysis",
    "windows",
]
