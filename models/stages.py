"""The stage names in DAG order: the one order the flow runs, the CLI lists and the dashboard shows them in
(flows/stages.py maps each name to its implementation)."""

from __future__ import annotations

STAGE_ORDER = ["characters", "queries", "responses", "filter", "dedup", "sft_data"]


def stage_sort_key(stage: str) -> tuple[int, str]:
    """Sort key putting stages in DAG order, unknown names (from another version) after them by name."""
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), stage)
