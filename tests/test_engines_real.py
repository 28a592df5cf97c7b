"""Real engines with the bundled SmolLM2-135M-Instruct: vLLM in-process (one engine per session),
transformers, and the OpenAI client against a real local vLLM server (one per session) plus
deliberately faulty endpoints. Run them under `flock /tmp/heavy.lock` on shared machines."""

from __future__ import annotations

import gc
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from engines.base import Sampling, TransientEngineError, get_engine, is_transient
from models.config.engine import BUNDLED_MODEL, EngineConfig
from tests.plugins.engines import REPRO_CHATS, REPRO_SAMPLING, VLLM_CONFIG

pytestmark = pytest.mark.slow

ROLEPLAY = [
    {"role": "system", "content": "You are Sherlock Holmes, a fictional detective created by Arthur Conan Doyle. "
                                  "Answer in character, in the first person."},
    {"role": "user", "content": "What do you do on a rainy afternoon in London?"},
]
QUESTIONS_SCHEMA = {
    "type": "array", "minItems": 3, "maxItems": 3,
    "items": {"type": "object", "properties": {"question": {"type": "string", "maxLength": 120}},
              "required": ["question"], "additionalProperties": False},
}
QUERY_CHAT = [{"role": "user", "content": "Write 3 questions a fan might ask Sherlock Holmes about his life. "
                                          'Reply as JSON: [{"question": ...}, ...]'}]
ANSWER = Sampling(temperature=0.7, top_p=0.8, repetition_penalty=1.1, max_tokens=48)


def assert_questions(text: str) -> None:
    data = json.loads(text)
    assert isinstance(data, list) and len(data) == 3
    assert all(set(item) == {"question"} and isinstance(item["question"], str) for item in data)


# --- vLLM in-process ------------------------------------------------------------------------------

def test_vllm_answers_a_roleplay_prompt(vllm_engine):
    out = vllm_engine.generate([ROLEPLAY], ANSWER)
    g = out[0]
    assert len(g.text.split()) >= 3
    assert g.prompt_tokens > 30 and 0 < g.completion_tokens <= 48
    assert g.finish_reason in ("stop", "length")
    assert g.model == vllm_engine.model_id and g.model.startswith(BUNDLED_MODEL + "@")


def test_vllm_greedy_stop_and_length(vllm_engine):
    a, b = vllm_engine.generate([ROLEPLAY, ROLEPLAY], Sampling(temperature=0, max_tokens=8))
    assert a.text == b.text and a.finish_reason == "length" and a.completion_tokens == 8
    stop = a.text.split()[1]
    (c,) = vllm_engine.generate([ROLEPLAY], Sampling(temperature=0, max_tokens=8, stop=(stop,)))
    assert stop not in c.text and c.finish_reason == "stop"


def test_vllm_guided_json_matches_the_schema(vllm_engine):
    out = vllm_engine.generate([QUERY_CHAT] * 3, Sampling(temperature=0.7, max_tokens=200,
                                                           json_schema=QUESTIONS_SCHEMA))
    for g in out:
        assert g.finish_reason == "stop", g.text
        assert_questions(g.text)


def test_vllm_loads_once_for_many_threads(vllm_engine):
    def shard(i):
        return get_engine(VLLM_CONFIG).generate([ROLEPLAY] * 3, Sampling(temperature=0.7, max_tokens=8, n=2))

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(shard, range(4)))
    assert [len(o) for o in outs] == [6, 6, 6, 6]
    assert get_engine(VLLM_CONFIG) is vllm_engine
    assert vllm_engine.loads == 1


def test_vllm_same_seed_same_outputs(vllm_engine):
    """A second fresh engine with the same seed gives the first engine's first answers."""
    from engines.vllm_engine import VLLMEngine

    first = vllm_engine.first_outputs
    again = vllm_engine.generate(REPRO_CHATS, REPRO_SAMPLING)
    assert [g.text for g in again] != first  # really sampled: the RNG moved on
    fresh = VLLMEngine(VLLM_CONFIG)
    fresh.load()
    try:
        assert [g.text for g in fresh.generate(REPRO_CHATS, REPRO_SAMPLING)] == first
    finally:
        fresh.close()


def test_vllm_sampling_params_mapping():
    from engines.vllm_engine import sampling_params

    sp = sampling_params(Sampling(temperature=0.5, top_p=0.8, repetition_penalty=1.1, max_tokens=7, seed=3,
                                  stop=("END",), json_schema={"type": "object"}), per_request_seed=False)
    assert (sp.temperature, sp.top_p, sp.repetition_penalty, sp.max_tokens, sp.stop) == (0.5, 0.8, 1.1, 7, ["END"])
    assert sp.seed is None  # never per request on CPU
    assert sp.structured_outputs.json == {"type": "object"}
    assert sampling_params(Sampling(seed=3), per_request_seed=True).seed == 3


# --- transformers -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_engine(bundled_model_path):
    from engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(EngineConfig(kind="transformers", batch_size=4, device="auto"))
    engine.load()
    yield engine
    engine.close()


def test_transformers_batched_generation(hf_engine):
    chats = [ROLEPLAY, [{"role": "user", "content": "Hi"}], ROLEPLAY, QUERY_CHAT, ROLEPLAY]
    out = hf_engine.generate(chats, Sampling(temperature=0, max_tokens=12))
    assert len(out) == 5
    assert out[0].text == out[2].text == out[4].text  # greedy, independent of batch position and padding
    assert all(g.completion_tokens <= 12 and g.text for g in out)
    assert out[1].prompt_tokens < out[0].prompt_tokens
    single = hf_engine.generate([ROLEPLAY], Sampling(temperature=0, max_tokens=12))
    assert single[0].text == out[0].text


def test_transformers_sampling_seed_and_stop(hf_engine):
    sp = Sampling(temperature=0.9, top_p=0.9, max_tokens=16, seed=11)
    a = hf_engine.generate([ROLEPLAY] * 2, sp)
    b = hf_engine.generate([ROLEPLAY] * 2, sp)
    assert [g.text for g in a] == [g.text for g in b]
    greedy = Sampling(temperature=0, max_tokens=12)
    (g,) = hf_engine.generate([ROLEPLAY], greedy)
    word = g.text.split()[2]
    (c,) = hf_engine.generate([ROLEPLAY], greedy.model_copy(update={"stop": (word,)}))
    assert g.text.startswith(c.text) and word not in c.text and c.finish_reason == "stop"
    assert c.completion_tokens < g.completion_tokens


# --- OpenAI client against a real vLLM server ----------------------------------------------------

def server_engine(urls, **kw):
    from engines.openai_engine import OpenAIEngine

    opts = {"backoff_base": 0.05, "backoff_max": 0.2, "health_interval": 60}
    engine = OpenAIEngine(EngineConfig(kind="openai", base_urls=urls, options=opts, **kw))
    engine.load()
    return engine


def test_openai_against_a_real_vllm_server(vllm_server):
    engine = server_engine([vllm_server])
    try:
        assert engine.served_model == "smollm2"
        out = engine.generate([ROLEPLAY] * 3, ANSWER)
        assert all(len(g.text.split()) >= 3 and g.prompt_tokens > 30 and 0 < g.completion_tokens <= 48 for g in out)
        (q,) = engine.generate([QUERY_CHAT], Sampling(temperature=0.7, max_tokens=200, json_schema=QUESTIONS_SCHEMA))
        assert_questions(q.text)
    finally:
        engine.close()


def test_openai_structured_outputs_field_on_a_real_server(vllm_server):
    engine = server_engine([vllm_server], served_model="smollm2")
    engine.guided = "structured_outputs"
    try:
        (q,) = engine.generate([QUERY_CHAT], Sampling(temperature=0.7, max_tokens=200, json_schema=QUESTIONS_SCHEMA))
        assert_questions(q.text)
    finally:
        engine.close()


@pytest.mark.parametrize("mode", ["500", "flaky", "slow"])
def test_openai_retries_and_routes_around_a_faulty_endpoint(vllm_server, openai_stub, mode):
    bad = openai_stub(mode, fail_first=100)
    engine = server_engine([bad.url, vllm_server], served_model="smollm2", max_retries=3,
                           request_timeout=20 if mode == "slow" else 60)
    try:
        out = engine.generate([ROLEPLAY] * 6, Sampling(temperature=0.7, max_tokens=16))
        assert len(out) == 6 and all(g.text and g.completion_tokens > 0 for g in out)
        status = engine.endpoint_status()
        assert not status[0]["up"] and status[1]["served"] == 6
        assert bad.chat_hits <= 6  # each request tried it at most once before it was marked down
    finally:
        engine.close()


def test_openai_only_faulty_endpoints_raise_transient(openai_stub):
    engine = server_engine([openai_stub("flaky", fail_first=100).url], max_retries=2)
    try:
        with pytest.raises(TransientEngineError) as info:
            engine.generate([ROLEPLAY], Sampling(max_tokens=4))
        assert is_transient(info.value)
    finally:
        engine.close()


# --- streaming vs the batch path, cancellation, guided JSON on transformers -----------------------

GREEDY_CHATS = [ROLEPLAY, QUERY_CHAT, [{"role": "user", "content": "Name three rivers in Europe."}]]


def test_vllm_streaming_matches_the_batch_path_for_greedy_decoding(vllm_engine):
    """The AsyncLLM engine (per-request submit, the chat template rendered by the tokenizer) gives the
    same greedy text and prompt length as `vllm.LLM.chat` on the same model and settings."""
    from vllm import LLM

    from engines.bundled import resolve_model
    from engines.vllm_engine import llm_kwargs, run_chat

    greedy = Sampling(temperature=0, max_tokens=24)
    futures = [vllm_engine.submit(c, greedy) for c in GREEDY_CHATS]
    streamed = [f.result(600) for f in futures]
    llm = LLM(**llm_kwargs(VLLM_CONFIG, resolve_model(VLLM_CONFIG.model)))
    try:
        batch = run_chat(llm, GREEDY_CHATS, [greedy] * len(GREEDY_CHATS), "batch")
        guided = Sampling(temperature=0, max_tokens=120, json_schema=QUESTIONS_SCHEMA)
        (batch_json,) = run_chat(llm, [QUERY_CHAT], [guided], "batch")
    finally:
        del llm
        gc.collect()  # stops the reference engine's core process
    assert [g.text for g in streamed] == [g.text for g in batch]
    assert [g.prompt_tokens for g in streamed] == [g.prompt_tokens for g in batch]
    assert vllm_engine.submit(QUERY_CHAT, guided).result(600).text == batch_json.text


def test_closing_the_vllm_engine_cancels_outstanding_requests():
    from engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(VLLM_CONFIG)
    engine.load()
    futures = [engine.submit(ROLEPLAY, Sampling(temperature=0.7, max_tokens=400)) for _ in range(8)]
    engine.close()  # returns: no hang on running requests
    assert all(f.cancelled() for f in futures)


def test_queries_stage_on_transformers_with_the_bundled_model_yields_queries(tmp_path):
    """Guided JSON enforced by xgrammar: the bundled 135M model writes parseable question JSON."""
    from flows.build import run_build
    from storage.reader import CatalogReader

    res = run_build(overrides=["engine.kind=transformers", "characters.top_n=2", "characters.shard_size=2",
                               "queries.pairings=1", "queries.sampling.max_tokens=160"],
                    home=tmp_path / "home", until="queries")
    assert res["status"] == "completed", res
    with CatalogReader(tmp_path / "home") as rd:
        st = {s["stage"]: s for s in rd.stage_stats(res["run_id"])}
    assert st["queries"]["rows_out"] > 0, st["queries"]


# --- CUDA paths -----------------------------------------------------------------------------------

@pytest.mark.gpu
def test_vllm_on_gpu_with_per_request_seed():
    from engines.vllm_engine import VLLMEngine, on_cpu

    assert not on_cpu()
    engine = VLLMEngine(EngineConfig(kind="vllm", gpu_memory_utilization=0.3))
    engine.load()
    try:
        sp = Sampling(temperature=0.9, max_tokens=16, seed=5)
        a = engine.generate([ROLEPLAY, QUERY_CHAT], sp)
        b = engine.generate([QUERY_CHAT, ROLEPLAY], sp)
        assert a[0].text == b[1].text and a[1].text == b[0].text  # seeded per request, batch order irrelevant
    finally:
        engine.close()


@pytest.mark.gpu
def test_vllm_replica_pool_on_gpus():
    import torch

    from engines.vllm_engine import VLLMEngine

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    engine = VLLMEngine(EngineConfig(kind="vllm", replicas=2, gpu_memory_utilization=0.3))
    engine.load()
    try:
        out = engine.generate([ROLEPLAY] * 8, Sampling(temperature=0, max_tokens=8))
        assert len(out) == 8 and len({g.text for g in out}) == 1
    finally:
        engine.close()


@pytest.mark.gpu
def test_transformers_on_cuda():
    from engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(EngineConfig(kind="transformers", device="cuda"))
    engine.load()
    try:
        assert engine.device == "cuda"
        (g,) = engine.generate([ROLEPLAY], Sampling(temperature=0, max_tokens=8))
        assert g.text and g.completion_tokens <= 8
    finally:
        engine.close()
