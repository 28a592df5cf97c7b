"""The `ditto` command line. Exit codes: 0 ok, 1 run failed, 2 bad config, usage or input (a home without a
catalog, an export target that is a file or not empty, a damaged shard), 3 catalog busy (a run holds it),
4 a resource in use (the dashboard's port). Expected errors print one plain-text line on stderr, never a
traceback; `--json` commands print only JSON on stdout (logs, theirs and their subprocesses', go to stderr)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

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
    _say("error: ", msg)
    raise typer.Exit(code)


def _say(prefix: str, msg: str, style: str = "bold red") -> None:
    """One line on stderr; the message is plain text (a `[/]` or `[x]` in a path is printed as is)."""
    console.print(Text(prefix, style=style) + Text(str(msg)), highlight=False, soft_wrap=True)


def _t(value: Any) -> Text:
    """A table cell or line as plain text, never parsed as rich markup."""
    return Text("" if value is None else str(value))


@contextmanager
def _errors() -> Iterator[None]:
    """Expected failures as one line and their exit code."""
    from flows.export import ExportError
    from models.config import ConfigError
    from storage.catalog import CatalogBusy, CatalogError
    from storage.layout import InvalidRunId

    try:
        yield
    except CatalogBusy as exc:
        _fail(str(exc), 3)
    except (CatalogError, ConfigError, ExportError, InvalidRunId) as exc:
        _fail(str(exc), 2)


@contextmanager
def _flow_command(as_json: bool) -> Iterator[None]:
    """Around a flow a command runs (train, eval, crosssup): expected errors as one line, stdout kept for
    --json, the engines it loaded closed after."""
    with _errors(), _json_stdout(as_json):
        try:
            yield
        finally:
            from engines.base import close_engines

            close_engines()


@contextmanager
def _json_stdout(enabled: bool) -> Iterator[None]:
    """While a --json command works, stdout is stderr: for this process (sys.stdout and file descriptor 1)
    and for the processes it starts (vLLM workers inherit descriptor 1). The JSON is printed after."""
    if not enabled:
        yield
        return
    saved_obj = sys.stdout
    try:
        saved_obj.flush()
    except (OSError, ValueError):
        pass
    saved_fd = None
    try:
        saved_fd = os.dup(1)
        os.dup2(2, 1)
    except OSError:
        saved_fd = None
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        sys.stdout = saved_obj
        if saved_fd is not None:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


def _check_run_id(run_id: str | None) -> None:
    from storage.layout import InvalidRunId, validate_run_id

    if run_id is not None:
        try:
            validate_run_id(run_id)
        except InvalidRunId as exc:
            _fail(f"--run-id: {exc}", 2)


def _reader(home: str | None):
    """The snapshot reader of an existing catalog; a home without one is an error naming it (exit 2)."""
    from flows.build import resolve_home
    from storage.catalog import CatalogError
    from storage.reader import CatalogReader

    try:
        return CatalogReader(resolve_home(home), require=True)
    except CatalogError as exc:
        _fail(str(exc), 2)


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
            # the rows the summary table counts (rows_out: turns for session stages), not the records
            t = self.tasks[stage]
            n = data["rows_out"] if data.get("rows_out") is not None else (data.get("rows") or 0)
            self.p.update(t, advance=1, rows=self.p.tasks[t].fields.get("rows", 0) + n)
        elif event == "stage_end" and stage in self.tasks:
            t = self.tasks[stage]
            total = self.p.tasks[t].total
            if total is None:
                self.p.update(t, total=self.p.tasks[t].completed or 1, completed=self.p.tasks[t].completed or 1)
            rows_out = (data.get("stats") or {}).get("rows_out")
            if rows_out is not None:
                self.p.update(t, rows=rows_out)


def _stages_table(stages: list[dict], title: str | None = None) -> Table:
    """The per-stage table of `ditto run` and `ditto show` (rows of CatalogReader.stage_summaries)."""
    t = Table(title=title)
    for col in ("stage", "shards", "failed", "reused", "rows in", "rows out", "rejected", "dropped by reason",
                "tokens", "cache hit/miss", "seconds"):
        t.add_column(col, justify="left" if col in ("stage", "dropped by reason") else "right")
    for s in stages:
        cache = f"{s['cache_hits']}/{s['cache_misses']}" if s["cache_hits"] or s["cache_misses"] else "-"
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(s["dropped"].items())) or "-"
        t.add_row(*map(_t, (s["stage"], f"{s['shards']['done']}/{s['shards_total']}", s["shards"]["failed"],
                            s["reused"], s["rows_in"], s["rows_out"], s["rejected"], dropped,
                            s["prompt_tokens"] + s["completion_tokens"], cache, f"{s['seconds']:.1f}")))
    return t


def _run_and_report(fn, home: str | None, as_json: bool, verbose: bool, **kwargs: Any) -> None:
    _quiet_prefect(verbose)
    from flows.build import PROGRESS_HOOKS, RunFailed, resolve_home
    from flows.stages import ChainError
    from models.config import ConfigError
    from storage.catalog import CatalogBusy, CatalogError, catalog_held
    from storage.layout import InvalidRunId
    from storage.reader import CatalogReader

    _check_run_id(kwargs.get("run_id"))
    h = resolve_home(home)
    if catalog_held(h):  # before Prefect and the engine start: a second writer learns it at once
        _fail(f"another ditto process is using {h / 'catalog.duckdb'} (a run in progress): wait for it to "
              f"finish, or use another --home", 3)
    hook = None
    code, run_id = 0, kwargs.get("run_id")
    with _json_stdout(as_json):
        if not as_json:
            hook = _Progress()
            PROGRESS_HOOKS.append(hook)
            hook.p.start()
        try:
            summary = fn(home=home, **kwargs)
            run_id = summary["run_id"]
        except (ConfigError, ChainError, InvalidRunId) as exc:
            code = 2
            failure = str(exc)
        except CatalogBusy as exc:
            code, failure = 3, str(exc)
        except CatalogError as exc:
            code, failure = 2, str(exc)
        except RunFailed as exc:
            code, failure = 1, str(exc)
        finally:
            if hook:
                hook.p.stop()
                PROGRESS_HOOKS.remove(hook)
            from engines.base import close_engines

            close_engines()
    if code == 1:
        _say("run failed: ", failure)
    elif code:
        _fail(failure, code)
    with CatalogReader(h) as rd:
        run = rd.run(run_id) if run_id else None
        stages = rd.stage_summaries(run_id) if run_id else []
    if as_json:
        _print_json({"run": run, "stages": stages})
    elif run:
        out.print(_stages_table(stages, title=f"run {run_id}"))
        out.print(_t(f"status: {run['status']}   home: {h}   `ditto show {run_id}` for details"))
    raise typer.Exit(code)


@app.command()
def run(config: Annotated[Path | None, typer.Argument(help="run config YAML (default: the embedded demo)")] = None,
        set_: Annotated[list[str] | None, typer.Option("--set", help="override: key.path=value")] = None,
        until: Annotated[str | None, typer.Option(help="stop after this stage")] = None,
        home: HomeOpt = None, run_id: Annotated[str | None, typer.Option("--run-id")] = None,
        fresh: Annotated[bool, typer.Option(help="regenerate even where an identical shard exists")] = False,
        dry_run: Annotated[bool, typer.Option(
            "--dry-run", help="the whole DAG at zero cost in a throw-away home (placeholder text, no model): "
                              "prints per stage the shards, rows and columns; --home and the catalog are untouched")
        ] = False,
        as_json: JsonOpt = False, verbose: bool = False) -> None:
    """Run build_dataset (characters -> queries -> responses -> filter -> dedup -> sft_data)."""
    from flows.build import new_run_id, run_build

    if dry_run:
        _dry_run(str(config) if config else None, set_ or [], until, as_json, verbose)
        return
    run_id = run_id or new_run_id()  # known up front, so a failed run can still be reported
    _run_and_report(run_build, home, as_json, verbose, config_path=str(config) if config else None,
                    overrides=set_ or [], until=until, fresh=fresh, run_id=run_id)


def _dry_run(config: str | None, overrides: list[str], until: str | None, as_json: bool, verbose: bool) -> None:
    """`run --dry-run` (flows/dry_run.py): exit 0 when the dry run completed, 1 when shards failed, 2 on a bad
    config."""
    _quiet_prefect(verbose)
    from flows.dry_run import dry_run
    from flows.stages import ChainError
    from models.config import ConfigError

    with _json_stdout(as_json):
        try:
            plan = dry_run(config, overrides, until)
        except (ConfigError, ChainError) as exc:
            _fail(str(exc), 2)
        finally:
            from engines.base import close_engines

            close_engines()
    if as_json:
        _print_json(plan)
    else:
        t = Table(title=f"dry run ({plan['engine']} engine, nothing kept): {plan['num_shards']} shards, {plan['status']}")
        for c in ("stage", "shards", "with rows", "rows", "rejected", "columns"):
            t.add_column(c, overflow="fold")
        for st in plan["stages"]:
            t.add_row(st["stage"], str(st["shards"]), str(st["shards_with_rows"]), str(st["rows"]),
                      str(st["rejected"]), Text(", ".join(st["columns"])))
        out.print(t)
    if plan["status"] != "completed":
        _say("dry run failed: ", plan["error"] or "")
        raise typer.Exit(1)


@app.command()
def rerun(run_id: str, home: HomeOpt = None, as_json: JsonOpt = False, verbose: bool = False) -> None:
    """Recompute only the failed or missing shards of RUN_ID."""
    from flows.build import rerun as rerun_fn
    from flows.build import resolve_home
    from storage.catalog import CATALOG_FILE, snapshot_exists

    _check_run_id(run_id)
    h = resolve_home(home)
    if not snapshot_exists(h) and not (h / CATALOG_FILE).exists():
        _fail(f"no run {run_id!r} in {h} ({h} has no catalog: check --home or $DITTO_HOME)", 2)
    _run_and_report(lambda home, run_id: rerun_fn(run_id, home), home, as_json, verbose, run_id=run_id)


@app.command()
def runs(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List runs (a run whose process died shows as `interrupted`)."""
    with _reader(home) as rd:
        rows = rd.run_summaries()
    if as_json:
        _print_json(rows)
        return
    cols = ("run_id", "status", "dataset", "started_at", "finished_at", "failed_shards")
    t = Table()
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*(_t(r[c]) for c in cols))
    out.print(t)
    if not rows:
        out.print(_t("no runs yet"))


def run_details(home: str | None, run_id: str, verify: bool = False) -> dict[str, Any]:
    from flows.build import resolve_home
    from storage.report import show_extras

    _check_run_id(run_id)
    with _reader(home) as rd:
        run = rd.run(run_id)
        if run is None:
            _fail(f"no run {run_id!r} in {resolve_home(home)}", 2)
        stages = rd.stage_summaries(run_id, verify=verify)
        models, evals = rd.models(run_id), rd.evaluations(run_id)
        extras = show_extras(rd, run_id)  # notes (empty stages, warnings) and what changed since the last run
    run = dict(run)
    run["config"] = json.loads(run["config"]) if run.get("config") else None
    from tasks.filters.funnel import funnel

    return _jsonable({"run": run, "stages": stages, "models": models, "evaluations": evals,
                      "funnel": funnel(stages), **extras})


@app.command()
def show(run_id: str, home: HomeOpt = None, as_json: JsonOpt = False,
         verify: Annotated[bool, typer.Option("--verify", help="hash every shard file (default: sizes only)")]
         = False) -> None:
    """Stages, shards by status, rows, tokens, drops, errors and damaged shard files of a run."""
    d = run_details(home, run_id, verify=verify)
    if as_json:
        _print_json(d)
        return
    r = d["run"]
    out.print(_t(f"{r['run_id']}  status={r['status']}  shards={r['num_shards']}  started={r['started_at']}  "
                 f"finished={r['finished_at']}"))
    if r["status"] == "interrupted":
        out.print(_t("the process of this run ended without finishing it (killed?): "
                     f"`ditto rerun {r['run_id']}` continues it"))
    if r.get("error"):
        out.print(Text(str(r["error"]), style="red"))
    out.print(_stages_table(d["stages"]))
    from tasks.filters.funnel import funnel_lines

    for line in ["what was kept and why:", *funnel_lines(d["stages"])] if funnel_lines(d["stages"]) else []:
        out.print(_t(line))
    for s in d["stages"]:
        for e in s["errors"]:
            out.print(Text(f"{s['stage']}-{e['shard']}", style="red") + _t(f" (attempts {e['attempts']}): {e['error']}"))
        for e in s["damaged"]:
            out.print(Text(f"{s['stage']}-{e['shard']}", style="red") + _t(f" damaged: {e['problem']}; "
                                                                           f"`ditto rerun {r['run_id']}` rebuilds it"))
    for e in d["evaluations"]:
        out.print(_t(f"eval {e['model']} {e['language']} {e['metric']} = {e['value']:.3f} (n={e['n']})"))
    from flows.report import show_lines

    for line in show_lines(d):
        out.print(_t(line))


@app.command()
def export(run_id: str, to: Annotated[Path, typer.Option("--to", help="output folder (new or empty)")],
           format: Annotated[str, typer.Option("--format", help="parquet | jsonl | hf")] = "parquet",
           home: HomeOpt = None,
           overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty --to folder "
                                                   "(the new export is written beside it, then swapped in)")] = False,
           partial: Annotated[bool, typer.Option("--partial", help="export a run that is not completed (running, "
                                                 "failed, interrupted): its done shards only")] = False) -> None:
    """Export a run's data: every stage's shards (parquet/jsonl), or the SFT set as an HF dataset (hf).
    Every shard file is verified (size and sha256) first; a damaged one stops the export."""
    from flows.export import export_run

    _check_run_id(run_id)
    with _errors():
        written = export_run(run_id, to, format, home, overwrite=overwrite, partial=partial,
                             warn=lambda msg: _say("warning: ", msg, style="bold yellow"))
    for p in written:
        out.print(_t(p))


@app.command()
def repair(home: HomeOpt = None) -> None:
    """Rebuild a missing or corrupted catalog.duckdb from its Parquet snapshot, or write the snapshot again
    from a readable catalog. Never discards a readable catalog; refuses while a run holds it (exit 3)."""
    from flows.build import resolve_home
    from storage.catalog import (
        CATALOG_FILE,
        Catalog,
        CatalogBusy,
        CatalogCorrupt,
        CatalogError,
        catalog_held,
        snapshot_exists,
    )

    h = resolve_home(home)
    path = h / CATALOG_FILE
    busy = (f"another ditto process is using {path} (a run in progress): nothing was changed; "
            f"repair after it has finished")
    if catalog_held(h):
        _fail(busy, 3)
    if path.exists() and path.stat().st_size > 0:
        try:
            with Catalog(h) as cat:
                cat.touch_all()
                n = cat.query("SELECT count(*) AS n FROM runs")[0]["n"]
            out.print(_t(f"{path} opens fine (snapshot written again: {n} runs); nothing to repair"))
            return
        except CatalogBusy:
            _fail(busy, 3)
        except CatalogCorrupt as exc:
            if not snapshot_exists(h):
                _fail(f"{exc}; and there is no snapshot under {h / 'snapshot'} to rebuild it from: "
                      f"the file was left in place", 2)
            aside = _aside(path)
            path.rename(aside)
            wal = h / (CATALOG_FILE + ".wal")
            if wal.exists():
                wal.rename(Path(str(aside) + ".wal"))
            _say("", f"moved the unreadable catalog to {aside}", style="")
        except CatalogError as exc:  # unreadable for another reason (permissions...): never moved aside
            _fail(f"{exc}: nothing was changed", 2)
    elif not snapshot_exists(h):
        _fail(f"{h} has no catalog and no snapshot to rebuild one from: nothing to repair "
              f"(check --home or $DITTO_HOME)", 2)
    with _errors(), Catalog(h) as cat:  # a new catalog is seeded from the snapshot
        n = cat.query("SELECT count(*) AS n FROM runs")[0]["n"]
    out.print(_t(f"catalog rebuilt from the snapshot: {n} runs"))


@app.command()
def gc(home: HomeOpt = None,
       keep_runs: Annotated[int, typer.Option("--keep-runs", help="keep what the last K runs of each dataset "
                                              "used (and the shards they reused)")] = 7,
       dry_run: Annotated[bool, typer.Option("--dry-run", help="report what would be removed, remove nothing")]
       = False, as_json: JsonOpt = False) -> None:
    """Prune the generation cache (<home>/gencache) to what the last K runs used; refuses while a run
    holds the catalog (exit 3)."""
    from flows.build import resolve_home
    from storage.catalog import Catalog, catalog_held
    from storage.gencache import GenCacheError, keep_set
    from storage.gencache import gc as gc_cache

    h = resolve_home(home)
    if keep_runs < 1:
        _fail("--keep-runs must be at least 1", 2)
    if catalog_held(h):
        _fail(f"another ditto process is using {h / 'catalog.duckdb'} (a run in progress): nothing was pruned", 3)
    with _errors(), Catalog(h) as cat:  # held for the whole pruning: no run starts meanwhile
        runs = cat.query("SELECT run_id, dataset, started_at FROM runs")
        shards = cat.query("SELECT run_id, stage, shard, reused_from FROM shards")
        try:
            kept, keep = keep_set(runs, shards, keep_runs)
            res = gc_cache(h, keep, dry_run=dry_run)
        except GenCacheError as exc:
            _fail(str(exc), 2)
    res["runs_kept"] = kept
    if as_json:
        _print_json(res)
        return
    b, a = res["before"], res["after"]
    out.print(_t(f"generation cache {h / 'gencache'}: kept what {len(kept)} runs used ({res['shards_kept']} shards)"))
    out.print(_t(f"  generations {b['generations']} -> {a['generations']} ({res['generations_removed']} removed), "
                 f"chunks {b['chunks']} -> {a['chunks']} ({res['chunks_deleted']} deleted, "
                 f"{res['chunks_rewritten']} rewritten), {b['bytes']} -> {a['bytes']} bytes"
                 + ("  [dry run: nothing removed]" if dry_run else "")))


def _aside(path: Path) -> Path:
    """<catalog>.corrupt, or .corrupt.2, .3 ...: an earlier moved-aside file is never overwritten."""
    cand = path.with_suffix(".duckdb.corrupt")
    i = 2
    while cand.exists():
        cand = path.with_suffix(f".duckdb.corrupt.{i}")
        i += 1
    return cand


@app.command()
def train(run_id: str, home: HomeOpt = None,
          set_: Annotated[list[str] | None, typer.Option("--set", help="override: train.key=value")] = None,
          force: Annotated[bool, typer.Option(help="train again even if this model exists")] = False,
          as_json: JsonOpt = False, verbose: bool = False) -> None:
    """Fine-tune on RUN_ID's sft_data (TRL SFT, full or LoRA); registers the model in the catalog."""
    from flows.build import resolve_home
    from flows.train import train_flow

    _check_run_id(run_id)
    with _flow_command(as_json):
        res = train_flow(run_id=run_id, home=str(resolve_home(home)), overrides=set_ or [], force=force)
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

    _check_run_id(run_id)
    with _flow_command(as_json):
        res = evaluate_flow(run_id=run_id, home=str(resolve_home(home)), models=model or None, overrides=set_ or [])
    if as_json:
        _print_json(res)
        return
    if res.get("report") and Path(res["report"]).exists():
        out.print(_t(Path(res["report"]).read_text(encoding="utf-8")), highlight=False)
    out.print(_t(f"report: {res.get('report')}  plot: {res.get('plot')}"))


@app.command()
def crosssup(generator: Annotated[list[str], typer.Option(
                 "--generator", help="generator model (name or path); repeat: one dataset each")],
             student: Annotated[list[str], typer.Option(
                 "--student", help="student model; repeat: each is fine-tuned on every generator's data")],
             config: Annotated[Path | None, typer.Argument(help="run config YAML (default: the product defaults)")] = None,
             home: HomeOpt = None,
             set_: Annotated[list[str] | None, typer.Option("--set", help="override: key.path=value")] = None,
             prefix: Annotated[str, typer.Option(help="run ids are PREFIX-<generator>")] = "xsup",
             as_json: JsonOpt = False, verbose: bool = False) -> None:
    """The paper's cross-supervision grid: students (rows) x data generators (columns), before and after."""
    from flows.build import resolve_home
    from flows.crosssup import crosssup_flow

    _check_run_id(prefix)
    with _flow_command(as_json):
        res = crosssup_flow(home=str(resolve_home(home)), generators=generator, students=student,
                            config_path=str(config) if config else None, overrides=set_ or [], run_prefix=prefix)
    if as_json:
        _print_json(res)
        return
    out.print(_t(res["table"]), highlight=False)
    out.print(_t(f"grid: {res['path']}"))


def _port_free(host: str, port: int) -> str | None:
    """None if (host, port) can be bound, else why not."""
    import socket

    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


@app.command()
def dashboard(home: HomeOpt = None, port: Annotated[int, typer.Option(help="port")] = 8765,
              host: Annotated[str, typer.Option(help="bind address (default loopback only)")] = "127.0.0.1",
              ) -> None:
    """Read-only web dashboard over the catalog snapshot and the Parquet shards."""
    from dashboard.app import serve
    from flows.build import resolve_home

    why = _port_free(host, port)
    if why:
        _fail(f"cannot listen on {host}:{port}: {why} (another dashboard or server uses it?); pick another --port", 4)
    _say("", f"dashboard on http://{host}:{port}  (home {resolve_home(home)})", style="")
    serve(str(resolve_home(home)), host=host, port=port)


@app.command()
def deploy(prefect_yaml: Annotated[Path, typer.Argument(help="deployments file")] = Path("deploy/prefect.yaml"),
           ) -> None:
    """Apply the Prefect deployments (nightly build_dataset, train, evaluate, crosssup) and their work pools."""
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


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler cancelling the run, `kill`): unwinds like Ctrl-C, so the engines close (vLLM's
    engine-core process would otherwise outlive the run), Prefect's temporary server stops and the catalog
    keeps every finished shard; `ditto rerun <run>` continues."""


_TERMINATED: list[int] = []  # typer turns the interrupt into exit 130: remember it was SIGTERM


def _on_sigterm(signum: int, frame: Any) -> None:
    _TERMINATED.append(signum)
    raise Terminated(f"signal {signum}")


def main() -> None:
    # before anything imports prefect or vllm: their log levels are read at import
    _quiet_prefect("--verbose" in sys.argv)
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except SystemExit as exc:  # typer turns an interrupt into exit 130
        if _TERMINATED and exc.code == 130:
            console.print("terminated (SIGTERM): finished shards are kept; `ditto rerun <run>` continues")
            sys.exit(143)
        raise


if __name__ == "__main__":
    main()
