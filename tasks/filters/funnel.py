"""What a run kept and why: the quality funnel of the queries, filter and dedup stages, per reason, from
the stage stats `ditto show` and the dashboard already read (no Parquet scan)."""

from __future__ import annotations

from typing import Any

FUNNEL_STAGES = {"queries": "questions", "filter": "turns", "dedup": "turns"}


def funnel(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per quality stage present: rows in and out and the drops per reason, most frequent first.
    Turn stages give each reason's share of the turns in; the queries stage, whose input is characters and
    whose drops are questions (question.<code>) and calls (format, no_partner), gives shares of its drops."""
    out = []
    for s in stages:
        unit = FUNNEL_STAGES.get(s.get("stage", ""))
        if unit is None:
            continue
        dropped = {k: int(v) for k, v in (s.get("dropped") or {}).items() if v}
        total = sum(dropped.values())
        rows_in, rows_out = int(s.get("rows_in") or 0), int(s.get("rows_out") or 0)
        base = total if unit == "questions" else rows_in
        reasons = [{"reason": k, "n": n, "share": n / base if base else 0.0}
                   for k, n in sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))]
        out.append({"stage": s["stage"], "unit": unit, "rows_in": rows_in, "rows_out": rows_out, "dropped": total,
                    "kept_share": rows_out / rows_in if rows_in and unit == "turns" else None, "reasons": reasons})
    return out


def funnel_lines(stages: list[dict[str, Any]]) -> list[str]:
    lines = []
    for f in funnel(stages):
        if f["unit"] == "questions":
            head = f"{f['stage']}: {f['rows_in']} characters -> {f['rows_out']} query rows; {f['dropped']} dropped"
            of = "of drops"
        else:
            head = (f"{f['stage']}: {f['rows_in']} turns -> {f['rows_out']} kept ({(f['kept_share'] or 0):.0%}); "
                    f"{f['dropped']} dropped")
            of = "of turns"
        lines.append(head)
        for r in f["reasons"]:
            lines.append(f"    {r['reason']:<28} {r['n']:>7}  {r['share']:6.1%} {of}")
    return lines
