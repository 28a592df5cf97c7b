"""The `ditto` command line. Exit codes: 0 ok, 1 run failed, 2 bad config or usage, 3 catalog busy."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Ditto: role-play self-alignment data, "
                  "fine-tuning and evaluation as a Prefect DAG.")
model_app = typer.Typer(no_args_is_help=True, help="The bundled offline model.")
app.add_typer(model_app, name="model")
console = Console(stderr=True)
out = Console()
if not out.is_terminal:  # piped or captured: wide enough that tables are not cut
    out = Console(width=200)

HomeOpt = Annotated[str | None, typer.Option("--home", help="data home (default $DITTO_HOME, else ./.ditto)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _quiet_prefect(verbose: bool) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def _fail(msg: str, code: int) -> None:
    console.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(code)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _print_json(obj: Any) -> None:
    """Plain JSON on stdout (never wrapped or coloured): scripts and tests parse it."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


class _Progress:
    """Rich progress bars per stage (shards and rows), fed by the flow's progress hooks."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.p = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("shards  {task.fields[rows]} rows"), TimeElapsedColumn(), console=console,
                          transient=False)
        self.tasks: dict[str, Any] = {}

    def __call__(self, event: str, data: dict) -> None:
        stage = data.get("stage", "")
        if event == "stage_start":
            self.tasks[stage] = self.p.add_task(stage, total=data.get("total"), rows=0)
        elif event == "shard_done" and stage in self.tasks:
            t = self.tasks[stage]
            rows = self.p.tasks[t].fields.get("rows", 0) + (data.get("rows") or 0)
            self.p.update(t, advance=1, rows=rows)
        elif event == "stage_end" and stage in self.tasks:
            t = self.tasks[stage]
            total = self.p.tasks[t].total
            if total is None:
                self.p.update(t, total=self.p.tasks[t].completed or 1, completed=self.p.tasks[t].completed or 1)


def _summary_table(run_id: str, stages: list[dict]) -> Table:
    t = Table(title=f"run {run_id}")
    for col in ("stage", "shards", "failed", "reused", "rows in", "rows out", "dropped", "tokens", "seconds"):
        t.add_column(col, justify="left" if col in ("stage", "dropped") else "right")
    for s in stages:
        dropped = s.get("dropped") or {}
        if isinstance(dropped, str):
            dropped = json.loads(dropped)
        t.add_row(s["stage"], f"{s.get('shards_done', 0)}/{s.get('shards_total', 0)}", str(s.get("shards_failed", 0)),
                  str(s.get("shards_reused", 0)), str(s.get("rows_in", 0)), str(s.get("rows_out", 0)),
                  ", ".join(f"{k}={v}" for k, v in sorted(dropped.items())) or "-",
                  str((s.get("prompt_tokens") or 0) + (s.get("completion_tokens") or 0)),
                  f"{s.get('seconds') or 0:.1f}")
    return t


def _run_and_report(fn, home: str | None, as_json: bool, verbose: bool, **kwargs: Any) -> None:
    _quiet_prefect(verbose)
    from flows.build import PROGRESS_HOOKS, RunFailed, resolve_home
    from flows.stages import ChainError
    from models.config import ConfigError
    from storage.catalog import CatalogBusy, CatalogError
    from storage.reader import CatalogReader

    hook = None
    if not as_json:
        hook = _Progress()
        PROGRESS_HOOKS.append(hook)
        hook.p.start()
    code, run_id = 0, kwargs.get("run_id")
    try:
        summary = fn(home=home, **kwargs)
        run_id = summary["run_id"]
    except (ConfigError, ChainError) as exc:
        if hook:
            hook.p.stop()
        _fail(str(exc), 2)
    except CatalogBusy as exc:
        if hook:
            hook.p.stop()
        _fail(str(exc), 3)
    except CatalogError as exc:
        if hook:
            hook.p.stop()
        _fail(str(exc), 2)
    except RunFailed as exc:
        code = 1
        console.print(f"[bold red]run failed:[/] {exc}", highlight=False)
    finally:
        if hook:
            hook.p.stop()
            PROGRESS_HOOKS.remove(hook)
        from engines.base import close_engines

        close_engines()
    with CatalogReader(resolve_home(home)) as rd:
        run = rd.run(run_id) if run_id else None
        stages = rd.stage_stats(run_id) if run_id else []
    if as_json:
        _print_json({"run": run, "stages": stages})
    elif run:
        from flows.stages import STAGE_ORDER

        stages.sort(key=lambda s: STAGE_ORDER.index(s["stage"]) if s["stage"] in STAGE_ORDER else 99)
        out.print(_summary_table(run_id, stages))
        out.print(f"status: {run['status']}   home: {resolve_home(home)}   `ditto show {run_id}` for details")
    raise typer.Exit(code)


@app.command()
def run(config: Annotated[Path | None, typer.Argument(help="run config YAML (default: the embedded demo)")] = None,
        set_: Annotated[list[str] | None, typer.Option("--set", help="override: key.path=value")] = None,
        until: Annotated[str | None, typer.Option(help="stop after this stage")] = None,
        home: HomeOpt = None, run_id: Annotated[str | None, typer.Option("--run-id")] = None,
        fresh: Annotated[bool, typer.Option(help="regenerate even where an identical shard exists")] = False,
        as_json: JsonOpt = False, verbose: bool = False) -> None:
    """Run build_dataset (characters -> queries -> responses -> filter -> dedup -> sft_data)."""
    from flows.build import new_run_id, run_build

    run_id = run_id or new_run_id()  # known up front, so a failed run can still be reported
    _run_and_report(run_build, home, as_json, verbose, config_path=str(config) if config else None,
                    overrides=set_ or [], until=until, fresh=fresh, run_id=run_id)


@app.command()
def rerun(run_id: str, home: HomeOpt = None, as_json: JsonOpt = False, verbose: bool = False) -> None:
    """Recompute only the failed or missing shards of RUN_ID."""
    from flows.build import rerun as rerun_fn

    _run_and_report(lambda home, run_id: rerun_fn(run_id, home), home, as_json, verbose, run_id=run_id)


@app.command()
def runs(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List runs."""
    from flows.build import resolve_home
    from storage.reader import CatalogReader

    with CatalogReader(resolve_home(home)) as rd:
        rows = rd.query("SELECT r.run_id, r.status, r.dataset, r.started_at, r.finished_at, r.num_shards, "
                        "(SELECT count(*) FROM shards s WHERE s.run_id=r.run_id AND s.status='failed') AS failed_shards "
                        "FROM runs r ORDER BY started_at DESC")
    if as_json:
        _print_json(rows)
        return
    t = Table()
    for c in ("run_id", "status", "dataset", "started_at", "finished_at", "failed_shards"):
        t.add_column(c)
    for r in rows:
        t.add_row(*(str(r[c]) for c in ("run_id", "status", "dataset", "started_at", "finished_at", "failed_shards")))
    out.print(t)


def run_details(home: str | None, run_id: str) -> dict[str, Any]:
    from flows.build import resolve_home
    from flows.stages import STAGE_ORDER
    from storage.reader import CatalogReader

    with CatalogReader(resolve_home(home)) as rd:
        run = rd.run(run_id)
        if run is None:
            _fail(f"no run {run_id!r} in {resolve_home(home)}", 2)
        shards = rd.shards(run_id)
        stats = {s["stage"]: s for s in rd.stage_stats(run_id)}
        models = rd.query("SELECT * FROM models WHERE run_id=?", [run_id])
        evals = rd.query("SELECT eval_id, model, language, metric, value, n FROM evaluations WHERE run_id=?", [run_id])
    stages = []
    for name in sorted({s["stage"] for s in shards} | set(stats), key=lambda s: (STAGE_ORDER + [s]).index(s)):
        ss = [s for s in shards if s["stage"] == name]
        st = stats.get(name, {})
        stages.append({
            "stage": name,
            "shards": {k: sum(1 for s in ss if s["status"] == k) for k in ("pending", "running", "done", "failed")},
            "reused": sum(1 for s in ss if s["reused_from"]),
            "rows": sum(s["rows"] or 0 for s in ss if s["status"] == "done"),
            "rejected": sum(s["rejected_rows"] or 0 for s in ss if s["status"] == "done"),
            "rows_in": st.get("rows_in", 0), "rows_out": st.get("rows_out", 0), "dropped": st.get("dropped", {}),
            "requests": st.get("requests", 0), "prompt_tokens": st.get("prompt_tokens", 0),
            "completion_tokens": st.get("completion_tokens", 0), "format_failures": st.get("format_failures", 0),
            "seconds": st.get("seconds", 0.0),
            "errors": [{"shard": s["shard"], "error": s["error"], "attempts": s["attempts"]}
                       for s in ss if s["status"] == "failed"],
        })
    run = dict(run)
    run["config"] = json.loads(run["config"]) if run.get("config") else None
    return _jsonable({"run": run, "stages": stages, "models": models, "evaluations": evals})


@app.command()
def show(run_id: str, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Stages, shards by status, rows, tokens, drops and errors of a run."""
    d = run_details(home, run_id)
    if as_json:
        _print_json(d)
        return
    r = d["run"]
    out.print(f"[bold]{r['run_id']}[/]  status={r['status']}  shards={r['num_shards']}  started={r['started_at']}  "
              f"finished={r['finished_at']}")
    if r.get("error"):
        out.print(f"[red]{r['error']}[/]", highlight=False)
    t = Table()
    for c in ("stage", "done", "failed", "reused", "rows in", "rows out", "rejected", "dropped by reason",
              "tokens", "seconds"):
        t.add_column(c)
    for s in d["stages"]:
        t.add_row(s["stage"], str(s["shards"]["done"]), str(s["shards"]["failed"]), str(s["reused"]),
                  str(s["rows_in"]), str(s["rows_out"]), str(s["rejected"]),
                  ", ".join(f"{k}={v}" for k, v in sorted(s["dropped"].items())) or "-",
                  str(s["prompt_tokens"] + s["completion_tokens"]), f"{s['seconds']:.1f}")
    out.print(t)
    for s in d["stages"]:
        for e in s["errors"]:
            out.print(f"[red]{s['stage']}-{e['shard']}[/] (attempts {e['attempts']}): {e['error']}", highlight=False)
    for e in d["evaluations"]:
        out.print(f"eval {e['model']} {e['language']} {e['metric']} = {e['value']:.3f} (n={e['n']})")


@app.command()
def export(run_id: str, to: Annotated[Path, typer.Option("--to", help="output folder")],
           format: Annotated[str, typer.Option("--format", help="parquet | jsonl | hf")] = "parquet",
           home: HomeOpt = None) -> None:
    """Export a run's data: every stage's shards (parquet/jsonl), or the SFT set as an HF dataset (hf)."""
    from flows.export import ExportError, export_run

    try:
        written = export_run(run_id, to, format, home)
    except ExportError as exc:
        _fail(str(exc), 2)
    for p in written:
        out.print(str(p))


@app.command()
def repair(home: HomeOpt = None) -> None:
    """Rebuild a missing or corrupted catalog.duckdb from its Parquet snapshot."""
    from flows.build import resolve_home
    from storage.catalog import Catalog, CatalogError

    h = resolve_home(home)
    path = h / "catalog.duckdb"
    if path.exists():
        try:
            Catalog(h).close()
            out.print(f"{path} opens fine; nothing to repair")
            return
        except CatalogError:
            aside = path.with_suffix(".duckdb.corrupt")
            path.rename(aside)
            for wal in (h / "catalog.duckdb.wal",):
                if wal.exists():
                    wal.rename(wal.with_suffix(".wal.corrupt"))
            console.print(f"moved the unreadable catalog to {aside}")
    with Catalog(h) as cat:
        cat.restore_from_snapshot()
        n = cat.query("SELECT count(*) AS n FROM runs")[0]["n"]
    out.print(f"catalog rebuilt from the snapshot: {n} runs")


@app.command()
def train(run_id: str, home: HomeOpt = None,
          set_: Annotated[list[str] | None, typer.Option("--set", help="override: train.key=value")] = None,
          force: Annotated[bool, typer.Option(help="train again even if this model exists")] = False,
          as_json: JsonOpt = False, verbose: bool = False) -> None:
    """Fine-tune on RUN_ID's sft_data (TRL SFT, full or LoRA); registers the model in the catalog."""
    from flows.build import resolve_home
    from flows.train import train_flow
    from models.config import ConfigError
    from storage.catalog import CatalogBusy

    try:
        res = train_flow(run_id=run_id, home=str(resolve_home(home)), overrides=set_ or [], force=force)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except CatalogBusy as exc:
        _fail(str(exc), 3)
    if as_json:
        _print_json(res)
    else:
        out.print_json(data=_jsonable(res))


@app.command("eval")
def eval_cmd(run_id: str, model: Annotated[list[str] | None, typer.Option(
                 "--model", help="base | a model id from the catalog | a path or HF id; repeat to compare")] = None,
             home: HomeOpt = None,
             set_: Annotated[list[str] | None, typer.Option("--set", help="override: eval.key=value")] = None,
             as_json: JsonOpt = False, verbose: bool = False) -> None:
    """Evaluate models side by side on RUN_ID's held-out characters (or a WikiRoleEval file)."""
    from flows.build import resolve_home
    from flows.evaluate import evaluate_flow
    from models.config import ConfigError
    from storage.catalog import CatalogBusy

    try:
        res = evaluate_flow(run_id=run_id, home=str(resolve_home(home)), models=model or None,
                            overrides=set_ or [])
    except ConfigError as exc:
        _fail(str(exc), 2)
    except CatalogBusy as exc:
        _fail(str(exc), 3)
    finally:
        from engines.base import close_engines

        close_engines()
    if as_json:
        _print_json(res)
        return
    if res.get("report") and Path(res["report"]).exists():
        out.print(Path(res["report"]).read_text(encoding="utf-8"), highlight=False)
    out.print(f"report: {res.get('report')}  plot: {res.get('plot')}")


@app.command()
def dashboard(home: HomeOpt = None, port: Annotated[int, typer.Option(help="port")] = 8765,
              host: Annotated[str, typer.Option(help="bind address (default loopback only)")] = "127.0.0.1",
              ) -> None:
    """Read-only web dashboard over the catalog snapshot and the Parquet shards."""
    from dashboard.app import serve
    from flows.build import resolve_home

    console.print(f"dashboard on http://{host}:{port}  (home {resolve_home(home)})")
    serve(str(resolve_home(home)), host=host, port=port)


@app.command()
def deploy(prefect_yaml: Annotated[Path, typer.Argument(help="deployments file")] = Path("deploy/prefect.yaml"),
           ) -> None:
    """Apply the Prefect deployments (nightly build_dataset, train, evaluate) and their work pools."""
    from flows.deploy import DeployError, deploy_all

    try:
        res = deploy_all(str(prefect_yaml))
    except DeployError as exc:
        _fail(str(exc), 2)
    out.print_json(data=_jsonable(res))


@app.command("config")
def config_cmd(reference: Annotated[bool, typer.Option("--reference", help="Markdown table of every key")] = False,
               ) -> None:
    """Print the default run config as YAML (the embedded demo), or the key reference."""
    from flows.config_doc import default_yaml, reference_markdown

    sys.stdout.write((reference_markdown() if reference else default_yaml()) + "\n")


@model_app.command("prepare")
def model_prepare() -> None:
    """Convert the bundled SmolLM2-135M-Instruct GGUF into a safetensors folder (once; cached)."""
    from engines.bundled import prepare_bundled_model

    out.print(str(prepare_bundled_model()))


def main() -> None:
    # before anything imports prefect or vllm: their log levels are read at import
    _quiet_prefect("--verbose" in sys.argv)
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
