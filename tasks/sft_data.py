"""Stage `sft_data`: one chat example per session, rendered with the student model's chat template.

The system message is the session's brief introduction (never the profile). The train/validation split
is by character (the base QID, so a character's en and zh sessions fall on the same side), from a hash
of the run seed and the id: stable from run to run, and no character is on both sides. The loss mask
(assistant tokens only) is built at training time by `tasks.chat_template.assistant_token_mask`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from models.base import arrow_schema, from_table
from models.config import RunConfig
from models.ids import row_id
from models.records import ChatMessage, Session, SFTExample, base_id
from tasks.base import ShardOutput, Stage, StageContext
from tasks.chat_template import CHATML, get_renderer


def split_of(character_id: str, seed: int, validation_fraction: float) -> str:
    digest = hashlib.blake2b(f"{seed}:{base_id(character_id)}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    return "validation" if u < validation_fraction else "train"


def session_messages(session: dict) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": session["system"]}]
    for t in session["turns"]:
        msgs.append({"role": "user", "content": t["question"]})
        msgs.append({"role": "assistant", "content": t["answer"]})
    return msgs


def template_model_name(config: RunConfig) -> str:
    """The model whose chat template renders SFT text (unresolved: a name, for the shard hash)."""
    if config.sft.chat_template_model:
        return config.sft.chat_template_model
    if config.train.model:
        return config.train.model
    from engines.base import engine_class

    if not engine_class(config.engine.kind).has_model:  # the dry run: no model, so no chat template
        return CHATML
    return config.engine.model


def resolve_template_model(name: str) -> str:
    if name == CHATML:
        return name
    from engines.bundled import resolve_model

    return resolve_model(name)


# -- the stage ------------------------------------------------------------------------------------
class SFTDataStage(Stage):
    name = "sft_data"
    output = SFTExample
    inputs = {"dedup": Session}

    def fingerprint(self, config: RunConfig) -> dict[str, Any]:
        return {"sft": config.sft.model_dump(mode="json"), "seed": config.seed,
                "template_model": template_model_name(config), "revision": config.engine.revision}

    def run(self, ctx: StageContext, inputs: dict[str, list[dict]]) -> ShardOutput:
        sessions = inputs["dedup"]
        out = ShardOutput(rows=[])
        out.stats.rows_in = len(sessions)
        if not sessions:
            return out
        renderer = get_renderer(resolve_template_model(template_model_name(ctx.config)))
        frac = ctx.config.sft.validation_fraction
        for s in sessions:
            if not s.get("turns"):
                ctx.reject(out, s["id"], "empty", "session has no turns", character_id=s["character_id"])
                continue
            msgs = session_messages(s)
            text = renderer.render(msgs)
            split = split_of(s["character_id"], ctx.seed, frac)
            out.rows.append(SFTExample(
                id=row_id("sft", s["id"]), session_id=s["id"], character_id=s["character_id"], language=s["language"],
                split=split, messages=[ChatMessage(**m) for m in msgs], text=text, num_tokens=renderer.count(text),
                parents=[s["id"]]))
            out.stats.extra[split] = out.stats.extra.get(split, 0) + 1
        out.stats.extra["tokens"] = sum(r.num_tokens for r in out.rows)
        out.stats.rows_out = len(out.rows)
        return out


# -- reading and exporting ------------------------------------------------------------------------
def read_examples(paths: list[str | Path]) -> list[SFTExample]:
    from storage.shards import read_table

    rows: list[SFTExample] = []
    for p in paths:
        rows += from_table(read_table(p), SFTExample)
    return sorted(rows, key=lambda r: r.id)


LICENSE_NOTE = ("Derived from Wikipedia and Wikidata. Wikipedia text is licensed CC BY-SA 4.0 "
                "(https://creativecommons.org/licenses/by-sa/4.0/); Wikidata is CC0. The generated dialogues "
                "are derivatives of the Wikipedia profiles and are shared under CC BY-SA 4.0 with attribution "
                "to the Wikipedia articles listed per character. Model outputs are also subject to the "
                "generator model's licence.")


def _card(card_info: dict[str, Any], counts: dict[str, dict[str, int]], tokens: dict[str, int]) -> str:
    name = card_info.get("dataset", "ditto")
    splits = "\n".join(f"  - split: {s}\n    path: data/{s}-*.parquet" for s in counts)
    lines = [
        "---", "license: cc-by-sa-4.0", "task_categories:", "- text-generation", "tags:", "- role-play",
        "- ditto", "- synthetic", "configs:", "- config_name: default", "  data_files:", splits, "---", "",
        f"# {name}: Ditto role-play SFT data", "",
        "Multi-turn role-play sessions simulated by an LLM from Wikipedia character profiles (Ditto, "
        "arXiv 2401.12474). The system prompt is a brief introduction only; the profile is never in the data. "
        "Split by character: no character appears in both splits.", "",
        "| key | value |", "| --- | --- |",
    ]
    for key in ("run_id", "config_hash", "generator_model", "chat_template_model", "package_version", "created_at"):
        if card_info.get(key) is not None:
            lines.append(f"| {key} | `{card_info[key]}` |")
    lines += ["", "## Counts", "", "| split | language | sessions | tokens |", "| --- | --- | ---: | ---: |"]
    for split, by_lang in counts.items():
        for lang, n in sorted(by_lang.items()):
            lines.append(f"| {split} | {lang} | {n} | {tokens.get(f'{split}/{lang}', 0)} |")
    lines += ["", "## Fields", "",
              "`messages` (system / user / assistant chat turns), `text` (rendered with the student model's chat "
              "template), `num_tokens`, `character_id` (`QID@language`), `session_id`, `split`, `parents` "
              "(lineage ids).", "", "## Licence", "", LICENSE_NOTE, ""]
    for extra in card_info.get("notes", []) or []:
        lines.append(str(extra))
    return "\n".join(lines) + "\n"


def hf_features():
    """The Hugging Face `Features` of an exported example: derived from `SFTExample` (through its Arrow schema,
    the one the shards are written with), never restated."""
    import datasets

    return datasets.Features.from_arrow_schema(arrow_schema(SFTExample))


def export_hf(paths: list[str | Path], out_dir: str | Path, card_info: dict[str, Any] | None = None) -> Path:
    """Export sft_data shards as a Hugging Face dataset: `out_dir/hf` (save_to_disk), `out_dir/data/<split>-
    00000-of-00001.parquet` (the Hub's layout), `out_dir/README.md` (dataset card) and `out_dir/export.json`
    (counts). Returns out_dir."""
    import datasets

    card_info = dict(card_info or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    examples = read_examples(paths)
    by_split: dict[str, list[dict]] = {}
    for ex in examples:
        row = ex.model_dump()
        row["messages"] = [dict(m) for m in row["messages"]]
        by_split.setdefault(ex.split, []).append(row)
    features = hf_features()
    dd = datasets.DatasetDict({s: datasets.Dataset.from_list(rows, features=features)
                               for s, rows in sorted(by_split.items())})
    dd.save_to_disk(str(out / "hf"))
    (out / "data").mkdir(exist_ok=True)
    for split, ds in dd.items():
        ds.to_parquet(str(out / "data" / f"{split}-00000-of-00001.parquet"))
    counts: dict[str, dict[str, int]] = {}
    tokens: dict[str, int] = {}
    for ex in examples:
        counts.setdefault(ex.split, {}).setdefault(ex.language, 0)
        counts[ex.split][ex.language] += 1
        tokens[f"{ex.split}/{ex.language}"] = tokens.get(f"{ex.split}/{ex.language}", 0) + ex.num_tokens
    (out / "README.md").write_text(_card(card_info, counts, tokens), encoding="utf-8")
    summary = {"path": str(out), "counts": counts, "rows": len(examples),
               "characters": {s: len({base_id(r['character_id']) for r in rows}) for s, rows in by_split.items()}}
    (out / "export.json").write_text(json.dumps({**summary, "card_info": card_info}, indent=1, default=str))
    return out
