"""The Markdown report: models side by side, one row per (metric, language)."""

from __future__ import annotations

from typing import Any

from tasks.evaluate.scoring import METRICS


def _fmt(v: float | None, metric: str) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}" if metric in ("knowledge", "answer_tokens") else f"{v:.3f}"


def report_markdown(by_model: dict[str, list[dict[str, Any]]], title: str = "Role-play evaluation",
                    info: dict[str, Any] | None = None) -> str:
    """Models side by side: one row per (metric, language), one column per model."""
    models = list(by_model)
    langs = sorted({r["language"] for rows in by_model.values() for r in rows}, key=lambda x: (x != "all", x))
    lines = [f"# {title}", ""]
    for k, v in (info or {}).items():
        lines.append(f"- {k}: `{v}`")
    lines += ["", "| metric | language | n | " + " | ".join(models) + " |",
              "| --- | --- | ---: | " + " | ".join("---:" for _ in models) + " |"]
    for metric in METRICS:
        for lang in langs:
            vals, n = [], 0
            for m in models:
                row = next((r for r in by_model[m] if r["metric"] == metric and r["language"] == lang), None)
                vals.append(_fmt(row["value"] if row else None, metric))
                n = max(n, row["n"] if row else 0)
            lines.append(f"| {metric} | {lang} | {n} | " + " | ".join(vals) + " |")
    lines += ["", "identity, rejection, identity_embed, rejection_pattern: accuracy (higher is better); knowledge: "
              "judge score 1-10; out_of_role, judge_unparsable: rates (lower is better)."]
    return "\n".join(lines) + "\n"
