import pytest

from flows.build import input_hash
from models.config import ConfigError, load_config


@pytest.mark.parametrize("override, message", [
    ("engine.kindd=vllm", "unknown key 'engine.kindd'"),
    ("nosuchsection.x=1", "unknown key 'nosuchsection'"),
    ("characters.top_n=-3", "bad value for 'characters.top_n'"),
    ("characters.shard_size=0", "bad value for 'characters.shard_size'"),
    ("runner.max_workers=lots", "bad value for 'runner.max_workers'"),
    ("characters.source=dbpedia", "bad value for 'characters.source'"),
    ("engine", "expected key.path=value"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(overrides=[override])


def test_yaml_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("characters:\n  top_n: 5\n  colour: blue\n")
    with pytest.raises(ConfigError, match=r"unknown key 'characters\.colour'"):
        load_config(p)
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_gives_only_what_it_changes(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("characters:\n  top_n: 5\n")
    cfg = load_config(p, ["engine.kind=fake"])
    assert cfg.characters.top_n == 5 and cfg.characters.source == "bundled" and cfg.engine.kind == "fake"


def test_config_hash_is_canonical():
    a = load_config(overrides=["characters.top_n=5", "engine.kind=fake"])
    b = load_config(overrides=["engine.kind=fake", "characters.top_n=5"])
    assert a.config_hash() == b.config_hash() != load_config().config_hash()


def test_input_hash_changes_exactly_when_an_input_changes():
    from flows.stages import get_stage

    stage = get_stage("responses")
    cfg = load_config(overrides=["engine.kind=fake"])
    base = dict(stage="responses", fingerprint=stage.fingerprint(cfg), shard=3, num_shards=8,
                upstream={"queries": "q1", "characters": "c1"}, extra_digest=None, version="1.0")
    h = input_hash(**base)
    assert input_hash(**{**base, "upstream": {"characters": "c1", "queries": "q1"}}) == h  # order-free
    # unrelated config sections do not matter ...
    other = load_config(overrides=["engine.kind=fake", "runner.max_workers=9", "filter.enabled=false"])
    assert input_hash(**{**base, "fingerprint": stage.fingerprint(other)}) == h
    # ... but each of these does
    changes = [
        {"fingerprint": stage.fingerprint(load_config(overrides=["engine.kind=fake", "responses.sampling.top_p=0.5"]))},
        {"fingerprint": stage.fingerprint(load_config(overrides=["engine.kind=fake", "engine.model=/m/other"]))},
        {"fingerprint": stage.fingerprint(load_config(overrides=["engine.kind=fake", "engine.revision=abc"]))},
        {"version": "1.1"},
        {"upstream": {"queries": "q2", "characters": "c1"}},
        {"extra_digest": "d"},
        {"shard": 4},
    ]
    hashes = {input_hash(**{**base, **c}) for c in changes}
    assert h not in hashes and len(hashes) == len(changes)


def test_prompt_text_change_changes_the_fingerprint(monkeypatch):
    from flows.stages import get_stage
    from tasks import prompts

    cfg = load_config(overrides=["engine.kind=fake"])
    stage = get_stage("queries")
    before = stage.fingerprint(cfg)
    real = prompts.load("queries", "en")
    monkeypatch.setattr(prompts, "load", lambda name, lang: prompts.Template(name, lang, real.system + " ", real.user))
    assert stage.fingerprint(cfg) != before


def test_readme_documents_every_config_key():
    from pathlib import Path

    from flows.config_doc import reference_markdown

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    missing = [line.split("`")[1] for line in reference_markdown().splitlines()[2:]
               if line.split("`")[1] not in readme]
    assert not missing, f"README's configuration reference lacks {missing}: regenerate with `ditto config --reference`"
