"""The README is a runbook: what its commands name ships, the filter descriptions it ships load, and it stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from filterserve.demo import DEMO_INVESTMENT_RISK
from filterserve.filter_loader import load_filter

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# Folders of this repository: a path in a README command that starts with one of them must exist.
TOP_LEVEL = ("examples", "filterserve", "export", "model_repository", "serve", "client", "benchmarks", "tests", "docs", "deploy")


def _code_blocks() -> list[str]:
    return re.findall(r"```\w*\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def _named_paths() -> list[str]:
    """Every repository path a README code block names, and every local file its links point at."""
    named = [word.strip("`'\",;()") for block in _code_blocks() for word in block.split()]
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README.read_text(encoding="utf-8"))
    return sorted({p for p in named + links if p.split("/")[0] in TOP_LEVEL and "/" in p})


def test_the_readme_names_only_files_that_ship() -> None:
    paths = _named_paths()
    assert "examples/investment_risk_v2.json" in paths  # the second export of "Your own filter"
    assert [p for p in paths if not (ROOT / p).exists()] == []


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_filter_description_loads(path: Path) -> None:
    load_filter(path)


def test_the_example_description_is_the_filter_the_demo_trains() -> None:
    # The README exports the demo's trained investment-risk filter with this file: same dimensions, cut and tiers.
    assert load_filter(ROOT / "examples" / "investment_risk_v2.json") == DEMO_INVESTMENT_RISK


def test_the_readme_stays_a_runbook() -> None:
    assert len(README.read_bytes()) <= 15_000  # depth goes to docs/
