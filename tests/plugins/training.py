"""Fixtures for SFT data, training and evaluation: a tiny random Llama with a tiny byte-level BPE tokenizer
(SmolLM2's ChatML template), hand-made characters and sessions, a run home with sft_data shards registered
in the catalog, and a scripted judge engine that answers in the judge prompts' formats."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engines.base import Engine, Generation, register_engine
from models.base import to_table
from models.config import RunConfig, load_config
from models.ids import row_id
from models.records import Character, Session, SessionTurn, SFTExample, character_row_id
from storage.catalog import Catalog
from storage.layout import RunLayout
from storage.shards import write_table

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

NAMES = [("Q1", "Alice", "a girl who fell down a rabbit hole", "fictional"),
         ("Q2", "Sherlock Holmes", "a consulting detective in London", "fictional"),
         ("Q3", "Ada Lovelace", "an English mathematician", "real"),
         ("Q4", "Napoleon", "a French emperor", "real"),
         ("Q5", "Frodo Baggins", "a hobbit of the Shire", "fictional"),
         ("Q6", "Marie Curie", "a physicist and chemist", "real"),
         ("Q7", "Captain Nemo", "the captain of the Nautilus", "fictional"),
         ("Q8", "Cleopatra", "the last queen of Ptolemaic Egypt", "real")]

PROFILE_MARK = "SECRETPROFILE"


def make_characters(n: int = 8, language: str = "en") -> list[dict]:
    out = []
    for qid, label, desc, cat in NAMES[:n]:
        out.append(Character(id=qid, label=label, description=desc, category=cat, language=language,
                             summary=f"{label} is {desc}. {PROFILE_MARK} {label} lived a long life of adventures.",
                             article=f"{PROFILE_MARK} article of {label}", source="bundled").model_dump())
    return out


def make_sessions(characters: list[dict]) -> list[dict]:
    out = []
    for c in characters:
        cid = character_row_id(c)
        turns = []
        for j, kind in enumerate(("role_specific", "contrastive", "role_specific")):
            q = f"Question {j} for {c['label']}: what do you think of the sea?"
            a = (f"As {c['label']}, I loved the sea ({j})." if kind == "role_specific"
                 else "I don't know anything about that, it is beyond my time.")
            turns.append(SessionTurn(turn_id=row_id("turn", cid, j), query_id=row_id("q", cid, j), kind=kind,
                                     question=q, answer=a))
        out.append(Session(id=row_id("session", cid), character_id=cid, label=c["label"], language=c["language"],
                           category=c["category"], system=f"You are {c['label']}, {c['description']}.", turns=turns,
                           parents=[t.turn_id for t in turns]).model_dump())
    return out


def _tiny_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"You are {label}, {desc}. Question for {label}: what do you think of the sea? I don't know "
              f"anything about that, it is beyond my time. As {label}, I loved the sea." for _, label, desc, _ in NAMES]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64, head_dim 64) with a tiny tokenizer and a ChatML template; random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = _tiny_tokenizer(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    return folder


class ScriptedJudge(Engine):
    """Deterministic stand-in for an LLM: answers judge prompts in their formats, role-plays otherwise.
    options.garbage=True makes every judge reply unparseable."""

    kind = "scripted"
    in_process = False

    def load(self) -> None:
        pass

    def _reply(self, chat: list[dict]) -> str:
        user = chat[-1]["content"]
        garbage = bool(self.config.options.get("garbage"))
        if "The character is one of these" in user:
            if garbage:
                return "hmm, hard to say"
            resp = user.split("[Response]")[-1]
            cands = re.findall(r"^- ([^:\n]+)", user, re.M)
            pick = next((c for c in cands if c in resp), cands[-1] if cands else "?")
            return f"The reply mentions them.\nThe most suitable role is [{pick}]."
        if "Score: N" in user:
            return "no idea what to score" if garbage else "The reply is plausible.\nScore: 7"
        if "Reply 1 if it declines" in user:
            if garbage:
                return "maybe"
            resp = user.split("[Response]")[-1]
            return "1" if "don't know" in resp else "0"
        system = chat[0]["content"] if chat[0]["role"] == "system" else ""
        m = re.match(r"You are ([^,]+),", system)
        who = m.group(1) if m else "someone"
        if "beyond" in user or "1 for" in user:
            return "I don't know anything about that."
        return f"As {who}, I can tell you about it."

    def _generate(self, chats, sampling):
        return [Generation(text=self._reply(c), prompt_tokens=10, completion_tokens=8, model="scripted") for c in chats]


register_engine("scripted", "tests.plugins.training:ScriptedJudge")


def build_run(home: Path, run_id: str, *, characters: list[dict], sessions: list[dict],
              config: RunConfig, sft_rows: list | None = None, num_shards: int = 2) -> None:
    """Write characters / dedup (sessions) / sft_data shards of a run and register them, as the build flow does."""
    from tasks.base import StageContext
    from tasks.sft_data import SFTDataStage

    stage = SFTDataStage()
    with Catalog(home) as cat:
        cat.start_run(run_id, config.dataset, config.model_dump(mode="json"), config.config_hash(), "test", num_shards)
        for shard in range(num_shards):
            chars = [c for i, c in enumerate(characters) if i % num_shards == shard]
            cids = {character_row_id(c) for c in chars}
            sess = [s for s in sessions if s["character_id"] in cids]
            ctx = StageContext(run_id=run_id, stage="sft_data", shard=shard, num_shards=num_shards, config=config,
                               home=home)
            out = stage.run(ctx, {"dedup": sess})
            for name, rows, model in (("characters", chars, Character), ("dedup", sess, Session),
                                      ("sft_data", out.rows, SFTExample)):
                h = f"h{name}{shard}"
                path = RunLayout(home, run_id).shard(name, h, shard)
                size = write_table(to_table(rows, model), path)
                cat.mark_done(run_id, name, shard, h, rows=len(rows), path=str(path), bytes_=size, rejects_path=None,
                              rejected_rows=0, stats={})
        cat.finish_run(run_id, "completed")


@pytest.fixture
def tiny_run_config(tiny_model_dir):
    def make(**sections) -> RunConfig:
        data = {"seed": 3, "engine": {"kind": "scripted", "model": str(tiny_model_dir)},
                "sft": {"validation_fraction": 0.3},
                "train": {"enabled": True, "max_steps": 2, "per_device_batch_size": 2, "learning_rate": 1e-3,
                          "save_steps": 1, "logging_steps": 1, "max_seq_length": 256},
                "eval": {"embedding": False, "plot": True}}
        for k, v in sections.items():
            data[k] = {**data.get(k, {}), **v}
        return load_config(data=data)
    return make


@pytest.fixture
def train_home(tmp_path, tiny_run_config):
    """A home with run 'r1': 8 characters, their sessions and sft_data shards (split 0.3 by character)."""
    home = tmp_path / "home"
    chars = make_characters()
    build_run(home, "r1", characters=chars, sessions=make_sessions(chars), config=tiny_run_config())
    return home
