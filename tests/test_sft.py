"""SFT data: chat-template rendering, assistant-only loss masks, no profile in the examples, the split by
character, and the Hugging Face export."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from models.base import arrow_schema
from models.config import load_config
from models.records import SFTExample
from storage.reader import CatalogReader
from tasks.base import StageContext
from tasks.chat_template import CHATML, ChatRenderer, assistant_token_mask
from tasks.sft_data import SFTDataStage, export_hf, session_messages, split_of, template_model_name
from tests.plugins.training import PROFILE_MARK, make_characters, make_sessions

MSGS = [{"role": "system", "content": "You are Alice, a girl."}, {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Alice of Wonderland."}, {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "Down the rabbit hole."}]


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _run_stage(config, sessions, shard=0):
    ctx = StageContext(run_id="r", stage="sft_data", shard=shard, num_shards=1, config=config, home=None)
    return SFTDataStage().run(ctx, {"dedup": sessions})


def test_assistant_mask_covers_exactly_the_assistant_turns(tokenizer):
    ids, labels = assistant_token_mask(tokenizer, MSGS)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(MSGS, tokenize=False)
    kept = tokenizer.decode([t for t, lbl in zip(ids, labels, strict=True) if lbl != -100])
    assert kept == "I am Alice of Wonderland.<|im_end|>\nDown the rabbit hole.<|im_end|>\n"
    masked = tokenizer.decode([t for t, lbl in zip(ids, labels, strict=True) if lbl == -100])
    assert "Who are you?" in masked and "You are Alice" in masked and "Wonderland" not in masked
    assert all(lbl in (-100, t) for t, lbl in zip(ids, labels, strict=True))
    short_ids, short_labels = assistant_token_mask(tokenizer, MSGS, max_length=10)
    assert len(short_ids) == len(short_labels) == 10


def test_trl_assistant_mask_needs_generation_markers(tokenizer):
    """Why labels are built here: SmolLM2's template has no {% generation %} markers, so the tokenizer's own
    assistant mask (what TRL's assistant_only_loss uses) is all zeros."""
    out = tokenizer.apply_chat_template(MSGS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert sum(out["assistant_masks"]) == 0
    _, labels = assistant_token_mask(tokenizer, MSGS)
    assert sum(lbl != -100 for lbl in labels) > 0


def test_stage_renders_with_template_and_never_the_profile(tiny_run_config, tokenizer):
    config = tiny_run_config()
    chars = make_characters()
    sessions = make_sessions(chars)
    out = _run_stage(config, sessions)
    assert len(out.rows) == len(sessions) and not out.rejects
    for row, s in zip(out.rows, sessions, strict=True):
        ex = SFTExample.model_validate(row.model_dump())
        assert ex.messages[0].role == "system" and ex.messages[0].content == s["system"]
        assert [m.role for m in ex.messages[1:]] == ["user", "assistant"] * len(s["turns"])
        assert ex.text == tokenizer.apply_chat_template(session_messages(s), tokenize=False)
        assert ex.num_tokens == len(tokenizer(ex.text, add_special_tokens=False)["input_ids"])
        blob = ex.model_dump_json()
        assert PROFILE_MARK not in blob
        assert ex.parents == [s["id"]]
    assert out.stats.rows_out == len(sessions)
    assert _run_stage(config, sessions).rows[0].id == out.rows[0].id  # stable ids


def test_empty_session_is_rejected_with_a_reason(tiny_run_config):
    s = make_sessions(make_characters(1))[0]
    s["turns"] = []
    out = _run_stage(tiny_run_config(), [s])
    assert not out.rows and out.rejects[0].filter == "empty"


def test_split_is_by_character_stable_and_seeded():
    ids = [f"Q{i}@{lang}" for i in range(400) for lang in ("en", "zh")]
    splits = {cid: split_of(cid, 7, 0.2) for cid in ids}
    for i in range(400):  # a character's sessions in every language share a side
        assert splits[f"Q{i}@en"] == splits[f"Q{i}@zh"]
    share = sum(v == "validation" for v in splits.values()) / len(ids)
    assert 0.12 < share < 0.28
    assert splits == {cid: split_of(cid, 7, 0.2) for cid in ids}
    assert splits != {cid: split_of(cid, 8, 0.2) for cid in ids}
    assert all(split_of(c, 7, 0.0) == "train" for c in ids)


def test_no_character_in_both_splits(tiny_run_config):
    chars = make_characters() + make_characters(language="zh")
    out = _run_stage(tiny_run_config(sft={"validation_fraction": 0.4}), make_sessions(chars))
    train = {r.character_id.split("@")[0] for r in out.rows if r.split == "train"}
    val = {r.character_id.split("@")[0] for r in out.rows if r.split == "validation"}
    assert train and val and not train & val


def test_template_model_choice_and_fingerprint(tiny_run_config, tiny_model_dir):
    config = tiny_run_config()
    assert template_model_name(config) == str(tiny_model_dir)
    fake = load_config(data={"engine": {"kind": "fake"}})
    assert template_model_name(fake) == CHATML
    other = load_config(data={"engine": {"kind": "fake"}, "sft": {"chat_template_model": "x/y"}})
    stage = SFTDataStage()
    assert stage.fingerprint(fake) != stage.fingerprint(other)
    text = ChatRenderer(CHATML).render(MSGS)
    assert text.startswith("<|im_start|>system\nYou are Alice") and text.endswith("<|im_end|>\n")


def test_export_hf_writes_dataset_parquet_and_card(train_home, tmp_path):
    import datasets

    with CatalogReader(train_home) as reader:
        paths = reader.done_paths("r1", "sft_data")
        run = reader.run("r1")
    out = tmp_path / "export"
    assert export_hf(paths, out, {"run_id": "r1", "config_hash": run["config_hash"], "dataset": "ditto"}) == out
    summary = json.loads((out / "export.json").read_text())
    dd = datasets.load_from_disk(str(out / "hf"))
    assert set(dd) == {"train", "validation"}
    assert sum(len(d) for d in dd.values()) == summary["rows"] == 8
    assert dd["train"][0]["messages"][0]["role"] == "system"
    for split in dd:
        assert pq.read_table(out / "data" / f"{split}-00000-of-00001.parquet").num_rows == len(dd[split])
        # the export's Features are the shards' schema, derived from SFTExample: every field, in order, same types
        assert dd[split].features.arrow_schema == pq.read_schema(paths[0]) == arrow_schema(SFTExample)
        assert list(dd[split].features) == list(SFTExample.model_fields)
    card = (out / "README.md").read_text()
    assert "license: cc-by-sa-4.0" in card and "r1" in card and run["config_hash"] in card
    assert "CC BY-SA" in card and "| train | en |" in card
    assert summary["counts"]["train"]["en"] == len(dd["train"])
