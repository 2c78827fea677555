"""Shared fixtures: every test runs offline in its own workspace."""

from __future__ import annotations

from pathlib import Path

import pytest

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLMIFY_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def dataset(name: str) -> Path:
    """Path of a shared real agent log; skips the test when ../shared is absent."""
    path = DATASETS / name / "calls.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} not found (the shared datasets live beside the checkout)")
    return path
