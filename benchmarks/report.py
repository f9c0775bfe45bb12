"""Writing a benchmark's markdown, JSON and PNG side by side, so every report reads the same way."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

from filterserve.export.manifest import versions


def _strict(value: Any) -> Any:
    """NaN/Inf become null: a broken variant must still leave a report that any JSON reader opens."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def machine() -> dict[str, Any]:
    import os

    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
    }


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_report(out: Path, stem: str, report: dict[str, Any], markdown: str, figure: Any) -> dict[str, Path]:
    """``<stem>.md``, ``<stem>.json`` and ``<stem>.png`` in ``out``; returns their paths."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{stem}.{ext}" for ext in ("md", "json", "png")}
    paths["md"].write_text(markdown, encoding="utf-8")
    paths["json"].write_text(json.dumps(_strict(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    figure.savefig(paths["png"], dpi=110, bbox_inches="tight")
    plt.close(figure)
    return paths


def grouped_bars(ax: Any, groups: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    """One cluster per group, one bar per series: how variants compare on each dimension or length."""
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([g + i * width - 0.4 + width / 2 for g in range(len(groups))], values, width, label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
