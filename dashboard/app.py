"""The Ditto web dashboard: runs, run detail (stage funnel, shard grid), sample browser, evaluation
trends. Read-only (see dashboard/data.py), server-rendered HTML with SVG charts and no JavaScript,
plus a JSON endpoint per page under /api. Binds 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from dashboard import svg
from dashboard.data import BadRequest, DashboardData, NotFound
from models.stages import STAGE_ORDER

logger = logging.getLogger("ditto.dashboard")
HERE = Path(__file__).resolve().parent
DEFAULT_PORT = 8765
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
MESSAGES = {400: "bad request", 404: "not found", 405: "method not allowed", 500: "internal error"}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f} s"
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"


def _num(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.2f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def url_segment(value: Any) -> str:
    """One URL path segment: every character that is not unreserved is percent-encoded, '/' included (Jinja's
    `urlencode` keeps '/', which would split an id like `AC/DC@en` into two segments)."""
    return quote(str(value), safe="")


def _raw_id(request: Request, after: str, decoded: str) -> str:
    """The id as the client encoded it: the raw path after `/<after>/`, percent-decoded once. (Routing works on
    the decoded path, and some clients decode twice, which would turn an id's own "%2F" into a '/'.)"""
    raw = request.scope.get("raw_path")
    marker = f"/{after}/".encode()
    if not raw or marker not in raw:
        return decoded
    try:
        return unquote_to_bytes(raw.split(marker, 1)[1]).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("id is not UTF-8") from None


def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["duration"] = _duration
    env.filters["num"] = _num
    env.filters["seg"] = url_segment
    return env


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(home: str | Path, allowed_hosts: list[str] | None = None) -> FastAPI:
    data = DashboardData(home)
    templates = _env()
    app = FastAPI(title="Ditto dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.data = data
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    def page(name: str, request: Request, status_code: int = 200, **ctx: Any) -> HTMLResponse:
        html = templates.get_template(name).render(request=request, home=str(data.home), stages=STAGE_ORDER, **ctx)
        return HTMLResponse(html, status_code=status_code)

    def error(request: Request, status: int) -> Response:
        msg = MESSAGES.get(status, "error")
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": msg, "status": status}, status_code=status)
        return page("error.html", request, status_code=status, status=status, message=msg)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> Response:
        return error(request, 404)

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest) -> Response:
        return error(request, 400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return error(request, 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return error(request, exc.status_code if exc.status_code in MESSAGES else 400)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        logger.exception("dashboard error on %s", request.url.path)
        return error(request, 500)

    # -- JSON ------------------------------------------------------------------------------------
    @app.get("/api/runs")
    def api_runs() -> dict:
        return {"runs": data.runs()}

    @app.get("/api/runs/{run_id}")
    def api_run(run_id: str) -> dict:
        return data.run(run_id)

    @app.get("/api/runs/{run_id}/characters")
    def api_characters(run_id: str, q: str | None = Query(None, max_length=100),
                       limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=1_000_000)) -> dict:
        return data.characters(run_id, q, limit, offset)

    @app.get("/api/runs/{run_id}/characters/{character_id:path}")
    def api_character(request: Request, run_id: str, character_id: str) -> dict:
        return data.character(run_id, _raw_id(request, "characters", character_id))

    @app.get("/api/runs/{run_id}/sessions/{session_id:path}")
    def api_session(request: Request, run_id: str, session_id: str) -> dict:
        return data.session(run_id, _raw_id(request, "sessions", session_id))

    @app.get("/api/runs/{run_id}/rejects")
    def api_rejects(run_id: str, stage: str | None = Query(None, max_length=32),
                    character: str | None = Query(None, max_length=200),
                    limit: int = Query(200, ge=1, le=1000), offset: int = Query(0, ge=0, le=1_000_000)) -> dict:
        return data.rejects(run_id, stage, character, limit, offset)

    @app.get("/api/evaluations")
    def api_evaluations() -> dict:
        return data.evaluations()

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return RedirectResponse("/static/favicon.svg", status_code=308)

    @app.get("/api/health")
    def api_health() -> dict:
        return {"ok": True}

    # -- HTML ------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def runs_page(request: Request) -> Response:
        return page("runs.html", request, runs=data.runs())

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(request: Request, run_id: str) -> Response:
        d = data.run(run_id)
        return page("run.html", request, d=d, funnel=svg.funnel(d["stages"]),
                    timeline=svg.timeline({s["stage"]: s["timeline"] for s in d["stages"]}))

    @app.get("/runs/{run_id}/samples", response_class=HTMLResponse)
    def samples_page(request: Request, run_id: str, q: str | None = Query(None, max_length=100),
                     offset: int = Query(0, ge=0, le=1_000_000)) -> Response:
        return page("samples.html", request, run_id=run_id, d=data.characters(run_id, q, 50, offset))

    @app.get("/runs/{run_id}/characters/{character_id:path}", response_class=HTMLResponse)
    def character_page(request: Request, run_id: str, character_id: str) -> Response:
        d = data.character(run_id, _raw_id(request, "characters", character_id))
        return page("character.html", request, run_id=run_id, d=d)

    @app.get("/runs/{run_id}/sessions/{session_id:path}", response_class=HTMLResponse)
    def session_page(request: Request, run_id: str, session_id: str) -> Response:
        return page("session.html", request, run_id=run_id, d=data.session(run_id, _raw_id(request, "sessions", session_id)))

    @app.get("/runs/{run_id}/rejects", response_class=HTMLResponse)
    def rejects_page(request: Request, run_id: str, stage: str | None = Query(None, max_length=32),
                     offset: int = Query(0, ge=0, le=1_000_000)) -> Response:
        return page("rejects.html", request, run_id=run_id, d=data.rejects(run_id, stage or None, None, 200, offset))

    @app.get("/evaluations", response_class=HTMLResponse)
    def evaluations_page(request: Request) -> Response:
        d = data.evaluations()
        charts = [svg.line_chart(f"{t['metric']}" + (f" ({t['language']})" if t["language"] else ""),
                                 t["runs"], t["series"]) for t in d["trends"]]
        return page("evaluations.html", request, d=d, charts=charts)

    return app


def serve(home: str | Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    """Serve the dashboard with uvicorn until interrupted (`ditto dashboard`)."""
    import uvicorn

    allowed = ["127.0.0.1", "localhost", "::1", "[::1]"] if _is_loopback(host) else None
    if not _is_loopback(host):
        logger.warning("dashboard listening on %s: it has no authentication, keep it behind a firewall", host)
    app = create_app(home, allowed_hosts=allowed)
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)


__all__ = ["DEFAULT_PORT", "create_app", "serve"]
