"""Shared pytest setup: every test runs from the repository root with the package importable."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
DATA = NBS / "data"  # test data shipped with the repository (see nbs/data/README.md)


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    # tests never reach the network: W&B runs offline unless a test says otherwise
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "offline"))
    monkeypatch.setenv("WANDB_SILENT", "true")
