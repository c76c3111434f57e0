"""The prose domain's candidates: smoe's own package and METADATA (which carries the README,
and so the demo's own printed output) stay out, other packages' come in."""

from __future__ import annotations

from smoe.data import sources


def test_prose_leaves_out_smoes_own_package(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    for dist in ("smoe-0.1.0.dist-info", "smoe_tools-2.0.dist-info", "numba-0.68.1.dist-info"):
        (site / dist).mkdir(parents=True)
        (site / dist / "METADATA").write_text("Name: x\n\nA description.\n")
    for pkg in ("smoe", "numba"):
        (site / pkg).mkdir()
        (site / pkg / "core.py").write_text('"""Docs."""\n')
        (site / pkg / "notes.md").write_text("Notes.\n")
    monkeypatch.setattr(sources, "site_dirs", lambda: [site])
    keys = list(sources.prose_source(seed=0).candidates())
    mine = [k for k in keys if "site-packages" in k]
    assert sorted(mine) == sorted(
        [
            f"metadata:{site / 'smoe_tools-2.0.dist-info' / 'METADATA'}",
            f"metadata:{site / 'numba-0.68.1.dist-info' / 'METADATA'}",
            f"docstrings:{site / 'numba' / 'core.py'}",
            f"doc:{site / 'numba' / 'notes.md'}",
        ]
    )
