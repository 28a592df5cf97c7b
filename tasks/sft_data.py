"""Stage `sft_data`: one chat example per session, rendered with the student model's chat template.

The system message is the session's brief introduction (never the profile). The train/validation split
is by character (the base QID, so a character's en and zh sessions fall on the same side), from a hash
of the run seed and the id: stable from run to run, and no character is on both sides. The loss mask
(assistant tokens only) is built at training time by `assistant_token_mask`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from models.base import from_table
from models.config import RunConfig
from models.ids import row_id
from models.records import ChatMessage, Session, SFTExample
from tasks.base import ShardOutput, Stage, StageContext

CHATML = "chatml"  # built-in ChatML renderer, no tokenizer (the fake engine's default)


def base_id(character_id: str) -> str:
    """'Q42@en' -> 'Q42': the split key shared by a character's sessions in every language."""
    return character_id.split("@", 1)[0]


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


# -- chat-template rendering ----------------------------------------------------------------------
class ChatRenderer:
    """Renders messages with a tokenizer's chat template and counts tokens; `chatml` needs no tokenizer."""

    def __init__(self, name: str):
        self.name = name
        self.tokenizer = None
        if name != CHATML:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(name)
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"tokenizer {name} has no chat template; set sft.chat_template_model")

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        if self.tokenizer is None:
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


_renderers: dict[str, ChatRenderer] = {}
_renderers_lock = threading.Lock()


def get_renderer(name: str) -> ChatRenderer:
    """One tokenizer per process and model, shared by every shard."""
    with _renderers_lock:
        if name not in _renderers:
            _renderers[name] = ChatRenderer(name)
        return _renderers[name]


def template_model_name(config: RunConfig) -> str:
    """The model whose chat template renders SFT text (unresolved: a name, for the shard hash)."""
    if config.sft.chat_template_model:
        return config.sft.chat_template_model
    if config.train.model:
        return config.train.model
    if config.engine.kind == "fake":
        return CHATML
    return config.engine.model


def resolve_template_model(name: str) -> str:
    if name == CHATML:
        return name
    from engines.bundled import resolve_model

    return resolve_model(name)


def assistant_token_mask(tokenizer, messages: list[dict[str, str]], max_length: int | None = None
                         ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation: labels are the token ids on assistant turns (their text and
    end-of-turn marker) and -100 elsewhere. Spans come from rendering each prefix of the conversation, so
    any chat template works (SmolLM2's has no {% generation %} markers, which TRL's assistant_only_loss
    needs)."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        end_text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(start_text) or not full.startswith(end_text):
            raise ValueError("chat template does not render conversations prefix by prefix; cannot mask turns")
        spans.append((len(start_text), len(end_text)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [-100] * len(ids)
    for k, (a, b) in enumerate(enc["offset_mapping"]):
        if b <= a:
            continue
        if any(s <= a < e for s, e in spans):
            labels[k] = ids[k]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


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
                out.rejects.append(ctx.reject(s["id"], "empty", "session has no turns", character_id=s["character_id"]))
                out.stats.dropped["empty"] += 1
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
    features = datasets.Features({
        "id": datasets.Value("string"), "session_id": datasets.Value("string"),
        "character_id": datasets.Value("string"), "language": datasets.Value("string"),
        "split": datasets.Value("string"),
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "text": datasets.Value("string"), "num_tokens": datasets.Value("int64"),
        "parents": [datasets.Value("string")]})
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
