"""The cross-supervision grid is reachable: `ditto crosssup` runs it end to end (tiny models, a scripted judge)
and `deploy/prefect.yaml` has its deployment."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from flows.cli import app
from storage.reader import CatalogReader
from tests.plugins.training import build_run, make_characters, make_sessions

ROOT = Path(__file__).resolve().parents[1]


def test_ditto_crosssup_runs_the_grid_from_the_command_line(tmp_path, tiny_run_config, tiny_model_dir, monkeypatch):
    import flows.crosssup

    built = []

    def build(cfg, home, run_id):  # the generation DAG is tested elsewhere: the generator's data, made by hand
        built.append((cfg.engine.model, run_id))
        chars = make_characters()
        build_run(home, run_id, characters=chars, sessions=make_sessions(chars), config=cfg)

    monkeypatch.setattr(flows.crosssup, "_default_build", build)
    config = tmp_path / "xsup.yaml"
    cfg = tiny_run_config(train={"max_steps": 1}, sft={"chat_template_model": str(tiny_model_dir)})
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    home = tmp_path / "h"
    res = CliRunner().invoke(app, ["crosssup", str(config), "--generator", "gen-a", "--student", str(tiny_model_dir),
                                   "--home", str(home), "--prefix", "xs", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert built == [("gen-a", "xs-gen-a")] and out["runs"] == {"gen-a": "xs-gen-a"}
    row = out["grid"][str(tiny_model_dir)]
    assert set(row) == {"base", "gen-a"} and row["gen-a"]["identity"] == 1.0
    assert Path(out["path"]).read_text(encoding="utf-8") == out["table"]
    with CatalogReader(home) as rd:
        assert [r["run_id"] for r in rd.query("SELECT run_id FROM models")] == ["xs-gen-a"]
        assert rd.query("SELECT count(DISTINCT model) AS n FROM evaluations")[0]["n"] == 2


def test_crosssup_has_a_deployment():
    from flows.crosssup import crosssup_flow
    from flows.deploy import validate

    (dep,) = validate(ROOT / "deploy" / "prefect.yaml", names=["crosssup"], root=ROOT)
    assert dep["entrypoint"] == "flows/crosssup.py:crosssup_flow" and dep["work_pool"]["name"] == "ditto-gpu"
    assert crosssup_flow.name == "crosssup"
    assert {"home", "generators", "students"} <= set(crosssup_flow.parameters.properties)
