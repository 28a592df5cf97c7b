"""The PNG bar chart beside the report (matplotlib, Agg backend, imported only here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.evaluate.scoring import METRICS


def report_plot(by_model: dict[str, list[dict[str, Any]]], path: str | Path, language: str = "all") -> Path:
    """Grouped bars per metric (knowledge scaled to 0-1), one bar per model; matplotlib Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in METRICS if m not in ("answer_tokens",)]
    models = list(by_model)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(shown) * max(1, len(models)) / 2), 4.0), dpi=110)
    width = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        vals = []
        for metric in shown:
            row = next((r for r in by_model[m] if r["metric"] == metric and r["language"] == language), None)
            v = row["value"] if row and row["value"] is not None else 0.0
            vals.append(v / 10 if metric == "knowledge" else v)
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(shown))]
        bars = ax.bar(xs, vals, width, label=m[-40:])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(shown)), [s if s != "knowledge" else "knowledge/10" for s in shown], rotation=20,
                  fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_title(f"Role-play evaluation ({language})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
