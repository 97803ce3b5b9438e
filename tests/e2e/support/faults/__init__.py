"""Environment for a process under test that should load ``faults/sitecustomize.py``."""

from __future__ import annotations

from pathlib import Path

FAULTS_DIR = Path(__file__).resolve().parent


def faults_env(fault: str) -> dict[str, str]:
    """Extra environment that injects ``fault`` (see sitecustomize.py for the list)."""
    return {"PYTHONPATH": str(FAULTS_DIR), "PORTUNUS_TEST_FAULT": fault}
