"""Fine-tuning (tiny Llama on CPU: full, LoRA, resume) and evaluation (parsers, metrics on hand-made judge
outputs, WikiRoleEval import, the evaluate flow end to end, the cross-supervision grid)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.evaluate import run_evaluation
from flows.train import TrainFlowError, run_training
from models.config import load_config
from models.config.eval import EvalConfig
from models.config.train import TrainConfig
from models.eval_records import Candidate, EvalItem
from storage.reader import CatalogReader
from tasks.evaluate import (
    aggregate,
    build_eval_set,
    embed_identity,
    is_out_of_role,
    is_refusal,
    parse_identity,
    parse_refusal,
    parse_score,
    pick_candidates,
    score_item,
)
from tasks.train import _scheduler, train_hash
from tasks.wikiroleeval import import_wikiroleeval
from tests.plugins.training import build_run, make_characters, make_sessions


def _weights(path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(a, b) -> bool:
    import torch

    return any(not torch.equal(a[k], b[k]) for k in a if k in b)


# -- training ---------------------------------------------------------------------------------------
def test_two_step_full_training_changes_weights_saves_reloads_and_registers(train_home, tiny_model_dir):
    result = run_training("r1", train_home)
    assert result.metrics["global_step"] == 2
    assert result.metrics["loss_tokens"] < result.metrics["train_tokens"]  # only assistant tokens in the loss
    assert "eval_loss" in result.metrics  # the validation split was scored
    final = Path(result.model_path)
    assert final == train_home / "runs" / "r1" / "train" / result.train_hash / "final"
    assert (final / "config.json").is_file() and (final / "tokenizer_config.json").is_file()
    assert _changed(_weights(tiny_model_dir), _weights(final))
    assert list(final.parent.glob("checkpoint-*"))
    with CatalogReader(train_home) as reader:
        (row,) = reader.query("SELECT * FROM models WHERE run_id='r1'")
    assert row["model_id"] == result.model_id and row["path"] == str(final)
    assert row["base_model"] == str(tiny_model_dir) and row["data_hash"] == result.data_hash
    assert json.loads(row["metrics"])["global_step"] == 2
    with CatalogReader(train_home) as reader:
        (art,) = reader.query("SELECT * FROM artifacts WHERE kind='model'")
    assert art["key"] == result.train_hash and art["path"] == str(final) and art["run_id"] == "r1"
    again = run_training("r1", train_home)  # registered and whole: not trained twice
    assert again.model_path == result.model_path and again.metrics == result.metrics and again.reused_from is None


def test_training_resumes_from_the_last_checkpoint(train_home):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt("simulated crash")

    sets = ["train.max_steps=4", "train.save_steps=2"]
    with pytest.raises(KeyboardInterrupt):
        run_training("r1", train_home, sets, callbacks=[Crash()])
    result = run_training("r1", train_home, sets)
    assert result.resumed_from and result.resumed_from.endswith("checkpoint-2")
    assert result.metrics["global_step"] == 4


def test_lora_training_merges_adapters(train_home, tiny_model_dir):
    result = run_training("r1", train_home, ["train.method=lora", "train.lora.r=4", "train.lora.alpha=8"])
    assert result.adapter_path and (Path(result.adapter_path) / "adapter_config.json").is_file()
    assert not (Path(result.model_path) / "adapter_config.json").exists()  # merged, loadable as a plain model
    assert _changed(_weights(tiny_model_dir), _weights(result.model_path))


@pytest.mark.slow
def test_accelerate_launcher_trains_in_a_subprocess(train_home):
    """train.launcher=accelerate: `accelerate launch -m tasks.train` (one CPU process here), result registered."""
    result = run_training("r1", train_home, ["train.launcher=accelerate",
                                             "train.accelerate_config=deploy/accelerate/cpu_single.yaml"])
    assert result.metrics["global_step"] == 2 and Path(result.model_path, "config.json").is_file()
    with CatalogReader(train_home) as reader:
        assert reader.query("SELECT model_id FROM models")[0]["model_id"] == result.model_id


def _fake_training(monkeypatch) -> list[str]:
    """train_model replaced by one that writes a small final folder: the flow's resume logic without torch.
    Returns the out_dirs trained in."""
    import flows.train
    from tasks.train import TrainResult

    trained: list[str] = []

    def fake(plan, **_):
        trained.append(plan.out_dir)
        final = Path(plan.out_dir) / "final"
        final.mkdir(parents=True, exist_ok=True)
        (final / "model.safetensors").write_bytes(b"weights of " + plan.key.encode() * 64)
        (final / "config.json").write_text("{}")
        return TrainResult(model_id=f"{plan.run_id}-{plan.key}", model_path=str(final), base_model=plan.base_model,
                           base_model_path=plan.base_model, data_hash=plan.data_hash, train_hash=plan.key,
                           out_dir=plan.out_dir, metrics={"global_step": len(trained)})

    monkeypatch.setattr(flows.train, "train_model", fake)
    return trained


def test_a_registered_model_resumes_from_the_catalog_across_runs_and_a_damaged_one_is_retrained(
        tmp_path, tiny_run_config, monkeypatch):
    trained = _fake_training(monkeypatch)
    home = tmp_path / "h"
    chars = make_characters()
    for run in ("r1", "r2"):  # two runs with the same sft data
        build_run(home, run, characters=chars, sessions=make_sessions(chars), config=tiny_run_config())
    first = run_training("r1", home)
    assert len(trained) == 1 and run_training("r1", home).model_path == first.model_path and len(trained) == 1
    reused = run_training("r2", home)  # same data, student and settings: the registered model is reused
    assert len(trained) == 1 and reused.model_path == first.model_path and reused.reused_from == "r1"
    assert reused.model_id.startswith("r2-") and reused.metrics == first.metrics
    with CatalogReader(home) as reader:
        row = reader.query("SELECT * FROM models WHERE run_id='r2'")[0]
    assert row["path"] == first.model_path and json.loads(row["config"])["reused_from"] == "r1"

    weights = Path(first.model_path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"!")  # damaged in place: same size, other bytes
    rebuilt = run_training("r2", home)
    assert len(trained) == 2 and "/runs/r2/" in rebuilt.model_path and rebuilt.reused_from is None
    with CatalogReader(home) as reader:
        (art,) = reader.query("SELECT run_id, path FROM artifacts WHERE kind='model'")
    assert art == {"run_id": "r2", "path": rebuilt.model_path}
    assert run_training("r1", home).reused_from == "r2" and len(trained) == 2  # r1 now reuses r2's rebuild

    changed = run_training("r2", home, ["train.learning_rate=0.01"])  # another key: trained anew
    assert len(trained) == 3 and changed.train_hash != rebuilt.train_hash
    assert run_training("r2", home, ["train.logging_steps=5"]).train_hash == rebuilt.train_hash  # not weights
    assert len(trained) == 3
    assert run_training("r2", home, force=True) and len(trained) == 4


@pytest.mark.parametrize("field", sorted(TrainConfig.model_fields))
def test_train_hash_covers_exactly_the_fields_that_change_the_weights(field):
    """train_hash's exclusions come from the fields' `weights=False` metadata: changing such a field keeps the
    key, changing any other changes it."""
    a = TrainConfig()
    value = getattr(a, field)
    other = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v / 2 if v else 0.5,
             str: lambda v: v + "x"}.get(type(value))
    if field == "lora":
        b = a.model_copy(update={"lora": a.lora.model_copy(update={"r": 8})})
    elif field in ("method", "lr_scheduler", "precision", "launcher"):
        b = a.model_copy(update={field: {"method": "lora", "lr_scheduler": "linear", "precision": "bf16",
                                         "launcher": "accelerate"}[field]})
    elif value is None:
        b = a.model_copy(update={field: {"model": "m2", "seed": 7, "accelerate_config": "c.yaml",
                                         "num_processes": 2}[field]})
    else:
        b = a.model_copy(update={field: other(value)})
    same = train_hash(a, "m", "d") == train_hash(b, "m", "d")
    assert same == (field in TrainConfig.not_weights()), field
    assert TrainConfig.not_weights() >= {"enabled", "output_name", "save_steps", "launcher"}


def test_sft_config_is_derived_from_the_train_config_metadata():
    import dataclasses

    from trl import SFTConfig

    cfg = TrainConfig(epochs=2.0, per_device_batch_size=3, max_seq_length=512, warmup_ratio=0.2)
    kwargs = cfg.sft_kwargs()
    assert set(kwargs) <= {f.name for f in dataclasses.fields(SFTConfig)}  # every target is a real SFTConfig field
    assert kwargs["num_train_epochs"] == 2.0 and kwargs["max_length"] == 512
    assert kwargs["per_device_train_batch_size"] == kwargs["per_device_eval_batch_size"] == 3
    assert kwargs["warmup_steps"] == 0.2  # transformers 5: a warmup_steps below 1 is a share of the steps
    args = SFTConfig(output_dir="unused", report_to="none", bf16=False, **kwargs)
    assert args.get_warmup_steps(100) == 20
    # the fields TRL takes in another form are computed by tasks/train.py; every other field maps by metadata
    computed = {"enabled", "model", "method", "lora", "lr_scheduler", "min_lr_ratio", "precision", "seed",
                "eval_validation", "output_name", "launcher", "accelerate_config", "num_processes"}
    mapped = {n for n, f in TrainConfig.model_fields.items() if (f.json_schema_extra or {}).get("sft")}
    assert mapped == set(TrainConfig.model_fields) - computed


def test_tasks_train_does_not_import_flows():
    import ast

    tree = ast.parse(Path("tasks/train.py").read_text())
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [n for n in names if n.split(".")[0] == "flows"]


def test_train_hash_and_schedule():
    a = TrainConfig()
    assert train_hash(a, "m", "d") == train_hash(a.model_copy(update={"save_steps": 5}), "m", "d")
    assert train_hash(a, "m", "d") != train_hash(a.model_copy(update={"learning_rate": 1e-5}), "m", "d")
    assert train_hash(a, "m", "d") != train_hash(a, "m", "d2")
    assert _scheduler(a) == ("cosine_with_min_lr", {"min_lr_rate": 0.1})  # 2e-6 -> 2e-7, the paper's
    name, kw = _scheduler(TrainConfig(lr_scheduler="linear"))
    assert name == "polynomial" and kw["lr_end"] == pytest.approx(2e-7)


def test_train_without_sft_data_fails_clearly(tmp_path, tiny_run_config):
    home = tmp_path / "h"
    build_run(home, "empty", characters=[], sessions=[], config=tiny_run_config(), num_shards=1)
    with pytest.raises((TrainFlowError, ValueError), match="no training examples|no finished"):
        run_training("empty", home)


# -- judge parsing and metrics --------------------------------------------------------------------
CANDS = [Candidate(label="Alice", description="a girl"), Candidate(label="Sherlock Holmes", description="a detective"),
         Candidate(label="Ada Lovelace"), Candidate(label="Napoleon")]


@pytest.mark.parametrize("text,expected", [
    ("Analysis...\nThe most suitable role is [Sherlock Holmes].", 1),
    ("最符合的角色为[Napoleon]", 3),
    ("the most suitable role is [sherlock holmes]", 1),
    ("The most suitable role is Ada Lovelace.", 2),
    ("The most suitable role is [3]", 2),
    ("It is clearly Alice speaking.", None),  # no closing sentence: an echoing judge must not score
    ("Either Alice or Napoleon.", None),
    ("I cannot tell.", None),
    ("", None),
])
def test_parse_identity(text, expected):
    assert parse_identity(text, CANDS) == expected


@pytest.mark.parametrize("text,expected", [
    ("Good answer.\nScore: 8", 8.0), ("analysis\n7", 7.0), ("分数：6", 6.0), ("Score: 11", None),
    ("great", None), ("", None), ("Rating\n[9]", 9.0),
])
def test_parse_score(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("1", True), ("0", False), (" 1.", True), ("是", True), ("no", False), ("Answer: 1", True),
    ("maybe", None), ("1 or 0", None), ("", None),
])
def test_parse_refusal(text, expected):
    assert parse_refusal(text) == expected


def _item(should_refuse=False, lang="en", iid="i1") -> EvalItem:
    return EvalItem(id=iid, session_id="s", turn=0, character_id="Q1@" + lang, label="Alice", language=lang,
                    system="You are Alice.", question="Where do you live?", should_refuse=should_refuse,
                    candidates=CANDS, correct=0)


def test_score_item_on_hand_made_judge_outputs_counts_unparseable():
    judge = {"identity": ["The most suitable role is [Alice].", "The most suitable role is [Napoleon].", "???"],
             "knowledge": ["Score: 6", "Score: 8", "no number here"],
             "rejection": ["1", "1", "garbage"]}
    r = score_item(_item(should_refuse=True), "m", "I don't know that place.", judge, embed_pick=0, answer_tokens=9)
    assert r.identity_picks == [0, 3, -1] and r.identity == pytest.approx(0.5)
    assert r.knowledge == pytest.approx(7.0) and r.knowledge_scores == [6.0, 8.0]
    assert r.refusal_votes == [1, 1, -1] and r.refused is True and r.rejection_correct is True
    assert r.unparsable == {"identity": 1, "knowledge": 1, "rejection": 1}
    assert r.embed_correct is True and r.pattern_refused and r.pattern_rejection_correct and not r.out_of_role
    # answering an answerable question is correct; refusing it is an error too
    wrong = score_item(_item(False), "m", "I don't know.", {"rejection": ["1", "0", "1"]})
    assert wrong.rejection_correct is False and wrong.identity is None and wrong.knowledge is None
    tie = score_item(_item(False), "m", "x", {"rejection": ["1", "0", "?"]})
    assert tie.refused is None and tie.rejection_correct is None


def test_aggregate_by_language_and_overall():
    items = [_item(False, "en", "a"), _item(True, "en", "b"), _item(False, "zh", "c")]
    good = {"identity": ["The most suitable role is [Alice]."] * 3, "knowledge": ["Score: 9"] * 3,
            "rejection": ["0"] * 3}
    bad = {"identity": ["x"] * 3, "knowledge": ["x"] * 3, "rejection": ["x"] * 3}
    results = [score_item(items[0], "m", "As Alice, I live here.", good),
               score_item(items[1], "m", "As an AI language model I cannot.", good),
               score_item(items[2], "m", "我不知道。", bad)]
    rows = {(r["language"], r["metric"]): r for r in aggregate(results, items)}
    assert rows[("all", "identity")]["value"] == 1.0 and rows[("all", "identity")]["n"] == 2
    assert rows[("en", "rejection")]["value"] == 0.5
    assert rows[("en", "rejection")]["details"]["missed_refusals"] == 1
    assert rows[("zh", "identity")]["value"] is None and rows[("zh", "identity")]["n"] == 0
    assert rows[("zh", "judge_unparsable")]["value"] == 1.0
    assert rows[("all", "judge_unparsable")]["value"] == pytest.approx(9 / 27)
    assert rows[("all", "out_of_role")]["value"] == pytest.approx(1 / 3)
    assert rows[("zh", "rejection_pattern")]["value"] == 0.0  # refused an answerable question


def test_refusal_and_out_of_role_patterns():
    for t in ("I'm afraid I have never heard of it.", "I don't know what a smartphone is.", "我不知道那是什么。",
              "Je ne sais pas.", "That is beyond my knowledge."):
        assert is_refusal(t), t
    for t in ("I sailed the seas for years.", "我在伦敦住了很多年。"):
        assert not is_refusal(t), t
    assert is_out_of_role("As an AI language model, I cannot have feelings.")
    assert is_out_of_role("作为一个人工智能，我无法回答。")
    assert not is_out_of_role("As the queen of Egypt, I ruled the Nile.")


def test_embedding_identity_picks_the_nearest_candidate():
    items = [_item(iid="a"), _item(iid="b").model_copy(update={"correct": 1})]
    picks = embed_identity(items, {"a": "I followed the white rabbit down the hole, I am a girl.",
                                   "b": "Elementary: as a detective I solve crimes from Baker Street."})
    assert picks == {"a": 0, "b": 1}


def test_candidates_same_language_and_category():
    chars = make_characters() + make_characters(language="zh")
    me = chars[0]
    cands, pos = pick_candidates(me, chars, 4, "language", "s")
    assert len(cands) == 4 and cands[pos].label == "Alice" and len({c.label for c in cands}) == 4
    cands2, _ = pick_candidates(me, chars, 4, "language", "s")
    assert cands == cands2
    cat, p = pick_candidates(me, chars, 3, "category", "s")
    fictional = {c["label"] for c in chars if c["category"] == "fictional"}
    assert all(c.label in fictional for c in cat)


def test_eval_set_from_heldout_sessions():
    chars = make_characters()
    sessions = make_sessions(chars)
    items = build_eval_set(chars, sessions, {"Q2", "Q5@en"}, EvalConfig(), 0)
    assert {it.character_id for it in items} == {"Q2@en", "Q5@en"} and len(items) == 6
    assert [it.should_refuse for it in items[:3]] == [False, True, False]
    assert all(it.evidence.startswith(it.label) for it in items)
    assert "SECRETPROFILE" not in items[0].system


# -- WikiRoleEval import ------------------------------------------------------------------------------
def test_wikiroleeval_importer_accepts_both_field_placements(tmp_path):
    top = {"system": "You are Alice, a girl.", "prompts": ["Who are you?", "What is an iPhone?"],
           "role_consist_cands": ["Alice", "Napoleon", "Cleopatra", "Ada Lovelace"],
           "rejection labels": [0, 1], "evidence": ["- Alice is a girl", "- "],
           "meta": {"label": "Alice", "description": "a girl", "lang": "en", "category": "fictional",
                    "summary": "Alice is a girl in a novel."}}
    in_meta = {"system": "你是拿破仑。", "prompts": ["你是谁？"],
               "meta": {"label": "拿破仑", "lang": "zh", "summary": "法国皇帝", "role_consist_cands":
                        ["- 拿破仑: 法国皇帝", "- 孔子: 思想家"], "rejection_labels": [0],
                        "evidence": [["拿破仑是法国皇帝"]]}}
    p = tmp_path / "wre.jsonl"
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in (top, in_meta)) + "\n", encoding="utf-8")
    items = import_wikiroleeval(p)
    assert len(items) == 3
    a0, a1, z = items
    assert a0.label == "Alice" and a0.candidates[a0.correct].label == "Alice" and len(a0.candidates) == 4
    assert (a0.should_refuse, a1.should_refuse, z.should_refuse) == (False, True, False)
    assert a1.turn == 1 and a0.session_id == a1.session_id and a0.evidence == "- Alice is a girl"
    assert z.language == "zh" and z.candidates[z.correct].label == "拿破仑" and z.candidates[1].description == "思想家"
    assert z.evidence == "- 拿破仑是法国皇帝" and z.system == "你是拿破仑。"
    j = tmp_path / "wre.json"
    j.write_text(json.dumps([top]), encoding="utf-8")
    assert [it.question for it in import_wikiroleeval(j)] == ["Who are you?", "What is an iPhone?"]


# -- the evaluate flow ----------------------------------------------------------------------------
def test_evaluate_flow_base_vs_tuned_end_to_end(train_home):
    result = run_training("r1", train_home)
    summary = run_evaluation("r1", train_home)  # default: base and the newest fine-tuned model
    assert set(summary["metrics"]) == {"base", result.model_id}
    report = Path(summary["report"]).read_text()
    assert f"| base | {result.model_id} |" in report and "| identity | all |" in report
    assert Path(summary["plot"]).stat().st_size > 1000
    for m in summary["metrics"].values():  # the scripted judge and model are consistent
        assert m["all/identity"] == 1.0 and m["all/knowledge"] == 7.0 and m["all/rejection"] == 1.0
        assert m["all/judge_unparsable"] == 0.0
    with CatalogReader(train_home) as reader:
        rows = reader.query("SELECT model, language, metric, value FROM evaluations WHERE eval_id=?",
                            [summary["eval_id"]])
    assert {r["model"] for r in rows} == {"base", result.model_id}
    assert {r["language"] for r in rows} == {"all", "en"}


def test_evaluate_flow_with_the_fake_engine_counts_unparseable_judging(tmp_path, tiny_run_config):
    home = tmp_path / "h"
    chars = make_characters()
    config = tiny_run_config(engine={"kind": "fake"}, sft={"chat_template_model": None})
    build_run(home, "rf", characters=chars, sessions=make_sessions(chars), config=config)
    summary = run_evaluation("rf", home, ["base"])
    m = summary["metrics"]["base"]
    assert m["all/judge_unparsable"] == 1.0 and m["all/identity"] is None
    assert m["all/rejection_pattern"] is not None and m["all/out_of_role"] == 0.0
    assert summary["info"]["judge"].startswith("fake:")


def test_evaluation_results_resume_from_the_catalog_and_a_damaged_file_is_judged_again(
        tmp_path, tiny_run_config, monkeypatch):
    import flows.evaluate

    calls: list[str] = []
    real = flows.evaluate.evaluate_model
    monkeypatch.setattr(flows.evaluate, "evaluate_model", lambda items, name, *a, **kw: (
        calls.append(name), real(items, name, *a, **kw))[1])
    home = tmp_path / "h"
    chars = make_characters()
    config = tiny_run_config(engine={"kind": "fake"}, sft={"chat_template_model": None})
    for run in ("rf1", "rf2"):  # two runs with the same held-out sessions
        build_run(home, run, characters=chars, sessions=make_sessions(chars), config=config)
    first = run_evaluation("rf1", home, ["base"])
    assert calls == ["base"] and run_evaluation("rf1", home, ["base"])["metrics"] == first["metrics"]
    other = run_evaluation("rf2", home, ["base"])  # same items, settings and model: the results are reused
    assert calls == ["base"] and other["metrics"] == first["metrics"] and "/runs/rf1/" in other["results"]["base"]
    with CatalogReader(home) as reader:
        assert {r["model"] for r in reader.query("SELECT model FROM evaluations WHERE run_id='rf2'")} == {"base"}

    results = Path(first["results"]["base"])
    data = bytearray(results.read_bytes())
    data[len(data) // 2] ^= 0xFF
    results.write_bytes(bytes(data))  # damaged: judged again, not read
    again = run_evaluation("rf2", home, ["base"])
    assert calls == ["base", "base"] and again["metrics"] == first["metrics"] and "/runs/rf2/" in again["results"]["base"]
    run_evaluation("rf2", home, ["base"], ["eval.judge_samples=1"])  # another key
    assert calls == ["base", "base", "base"]


def test_evaluate_flow_on_a_wikiroleeval_file(train_home, tmp_path):
    rec = {"system": "You are Alice, a girl.", "prompts": ["Question 0 for Alice?", "Question 1 for Alice?"],
           "role_consist_cands": ["Alice", "Napoleon"], "rejection_labels": [0, 1],
           "meta": {"label": "Alice", "lang": "en", "summary": "Alice is a girl."}}
    p = tmp_path / "w.jsonl"
    p.write_text(json.dumps(rec) + "\n")
    summary = run_evaluation("r1", train_home, ["base"], ["eval.source=wikiroleeval", f"eval.wikiroleeval_path={p}"])
    assert summary["info"]["source"] == "wikiroleeval" and summary["info"]["items"] == 2
    assert summary["metrics"]["base"]["all/rejection"] == 1.0


def test_cross_supervision_grid(tmp_path, tiny_run_config, tiny_model_dir):
    from flows.crosssup import cross_supervision

    built = []

    def fake_build(cfg, home, run_id):
        built.append((cfg.engine.model, run_id))
        chars = make_characters()
        build_run(home, run_id, characters=chars, sessions=make_sessions(chars), config=cfg)

    config = tiny_run_config(train={"max_steps": 1}, sft={"chat_template_model": str(tiny_model_dir)})
    out = cross_supervision(tmp_path / "h", ["gen-a", "gen-b"], [str(tiny_model_dir)], config=config,
                            build=fake_build)
    assert [b[0] for b in built] == ["gen-a", "gen-b"]
    row = out["grid"][str(tiny_model_dir)]
    assert set(row) == {"base", "gen-a", "gen-b"}
    assert all(v["identity"] == 1.0 for v in row.values())
    assert "| student | base | gen-a | gen-b |" in out["table"]
    assert load_config(data={"eval": {"judge": {"kind": "fake"}}}).eval.judge.kind == "fake"
