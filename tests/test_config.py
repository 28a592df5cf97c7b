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


# -- values checked at load time, before anything runs (issue 14, items 8 and 14) ------------------
@pytest.mark.parametrize("override, message", [
    ("characters.exclude_pattern=(unclosed", r"bad value for 'characters\.exclude_pattern': invalid regular "
                                             r"expression '\(unclosed'"),
    ('filter.out_of_role.extra_patterns=["fine", "a["]', r"bad value for 'filter\.out_of_role\.extra_patterns\.1': "
                                                          r"invalid regular expression 'a\['"),
    ("sessions.system_template=You are {name}", r"bad value for 'sessions\.system_template': unknown field "
                                                r"'\{name\}'.*\['description', 'label'\]"),
    ("sessions.system_template_zh=你是{名字}", r"'sessions\.system_template_zh': unknown field"),
    ("sessions.system_template=You are {label", r"'sessions\.system_template': not a valid template"),
    ("sessions.system_template=You are {0}", r"'sessions\.system_template': positional field"),
    ("sessions.system_template=You are {label.upper}", r"'sessions\.system_template': unknown field '\{label\.upper\}'"),
    ("characters.languages=[]", r"bad value for 'characters\.languages': List should have at least 1 item"),
    ("characters.categories=[]", r"bad value for 'characters\.categories': List should have at least 1 item"),
    ("characters.languages=[EN]", r"'characters\.languages': 'EN' is not a language code"),
    ("characters.languages=[en, zh, en]", r"'characters\.languages': listed more than once: \['en'\]"),
    ("characters.top_n=yes", r"bad value for 'characters\.top_n': Input should be a valid integer \(got True\)"),
    ("characters.top_n=true", r"bad value for 'characters\.top_n'"),
    ("runner.max_workers=no", r"bad value for 'runner\.max_workers'"),
    ("queries.sampling.temperature=on", r"bad value for 'queries\.sampling\.temperature'"),
    ("filter.length.bounds.de.max=50", r"missing key 'filter\.length\.bounds\.de\.min'"),
])
def test_bad_values_are_refused_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


@pytest.mark.parametrize("template", ["You are {label}.", "{label} ({description})", "Play {label:>5}. {{braces}}",
                                      "No fields at all."])
def test_good_templates_pass(template):
    assert load_config(overrides=[f"sessions.system_template={template}"]).sessions.system_template == template


def test_a_valid_template_renders_with_the_sessions_fields():
    from models.config.generation import SYSTEM_TEMPLATE_FIELDS
    from tasks.sessions import system_prompt

    cfg = load_config(overrides=["sessions.system_template=Be {label}; {description}!"]).sessions
    ch = {"label": "Ada", "description": "mathematician", "language": "en"}
    assert set(SYSTEM_TEMPLATE_FIELDS) == {"label", "description"}
    assert system_prompt(ch, cfg) == "Be Ada; mathematician!"


def test_partial_nested_override_merges_with_the_defaults(tmp_path):
    cfg = load_config(overrides=["filter.length.default.max=399"])
    assert (cfg.filter.length.default.min, cfg.filter.length.default.max) == (3, 399)
    assert cfg.filter.length.bounds["en"].max == 300  # the siblings stay
    cfg = load_config(overrides=["filter.length.bounds.en.max=100"])
    assert cfg.filter.length.bounds["en"].min == 3 and cfg.filter.length.bounds["zh"].max == 500
    # a section given in part keeps its field's own defaults, not the section class's
    p = tmp_path / "c.yaml"
    p.write_text("queries:\n  sampling:\n    temperature: 0.5\nfilter:\n  length:\n    default: {max: 399}\n")
    cfg = load_config(p)
    assert cfg.queries.sampling.temperature == 0.5 and cfg.queries.sampling.max_tokens == 320
    assert (cfg.filter.length.default.min, cfg.filter.length.default.max) == (3, 399)
    # a mapping given in YAML replaces the default mapping (it is a value, not a section)
    p.write_text("filter:\n  length:\n    bounds: {de: {min: 1, max: 9}}\n")
    assert set(load_config(p).filter.length.bounds) == {"de"}
    # an override still overrides the file
    assert load_config(p, ["filter.length.bounds.de.max=10"]).filter.length.bounds["de"].max == 10


def test_duplicate_yaml_keys_are_an_error_naming_the_key_and_file(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("characters:\n  top_n: 5\n  languages: [en]\n  top_n: 50\n")
    with pytest.raises(ConfigError, match=rf"{p}.*duplicate key 'top_n' \(line 4; first given on line 2\)"):
        load_config(p)
    p.write_text("engine: {kind: fake}\ncharacters: {top_n: 5}\nengine: {kind: vllm}\n")
    with pytest.raises(ConfigError, match="duplicate key 'engine'"):
        load_config(p)
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        load_config(overrides=["engine.options={a: 1, a: 2}"])


def test_numbers_in_yaml_are_read_as_users_write_them(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learning_rate: 5e-5\ncharacters:\n  top_n: 7\n")
    cfg = load_config(p, ["queries.sampling.top_p=1", "responses.sampling.temperature=1e-1"])
    assert cfg.train.learning_rate == pytest.approx(5e-5) and cfg.characters.top_n == 7
    assert cfg.queries.sampling.top_p == 1.0 and cfg.responses.sampling.temperature == pytest.approx(0.1)
    p.write_text("characters:\n  top_n: yes\n")
    with pytest.raises(ConfigError, match=rf"{p}: bad value for 'characters\.top_n'"):
        load_config(p)


def test_a_stored_config_loads_back_unchanged():
    cfg = load_config(overrides=["characters.top_n=3", "filter.length.default.max=399", "train.learning_rate=5e-5"])
    assert load_config(data=cfg.model_dump(mode="json")) == cfg


def test_a_stored_config_with_keys_an_earlier_release_wrote_still_loads_for_rerun():
    from models.config import RunConfig, migrate_stored_config

    stored = RunConfig().model_dump(mode="json")
    stored["filter"]["out_of_role"]["third_person"] = False
    stored["filter"]["out_of_role"]["other_names"] = True
    stored["filter"].pop("first_person")
    with pytest.raises(ConfigError, match="third_person"):
        load_config(data=stored)
    cfg = load_config(data=migrate_stored_config(stored))
    assert cfg.filter.first_person.enabled is False and cfg.filter.other_character.enabled is True
    assert "third_person" in stored["filter"]["out_of_role"]  # the stored record itself is not changed
