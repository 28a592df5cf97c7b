"""Plain transformers generation: the fallback where vLLM is unavailable, and the reference for tests.

Behind the streaming interface, requests wait in a queue that one dispatcher thread drains: it takes
the oldest request and up to `config.batch_size - 1` more with the same sampling settings (one HF
`generate()` call takes one generation config), left-pads their chat-templated prompts and generates
them as one static batch; temperature 0 means greedy decoding. HF batches are static, so requests
arriving meanwhile wait for the next batch; that is this engine's nature, not an interface barrier.

Guided JSON is enforced: `Sampling.json_schema` is compiled by xgrammar (shipped with vLLM) against the
model's tokenizer, without free whitespace, and applied as a logits processor (`xgrammar.contrib.hf`),
so even the bundled 135M model writes schema-valid JSON. Grammars are cached per schema.

Stop strings are applied after decoding (HF `stop_strings` re-scans the whole vocabulary on every
call, slower than the tokens it saves for short answers); completion_tokens then counts the kept text.

Seeding: the engine seeds torch with `config.seed` at load; a batch whose requests all carry the same
`Sampling.seed` is re-seeded with it, so the same prompts, seed and batch give the same text.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import Future
from typing import Any

from engines.base import Engine, EngineClosed, EngineError, Generation, Message, Sampling, expand, wait_all
from engines.bundled import bundled_model_id, resolve_model

INSTALL_HINT = "transformers and torch are needed: pip install torch transformers"


def _group_key(sp: Sampling) -> str:
    return sp.model_copy(update={"seed": None, "attempt": 1}).key()


class TransformersEngine(Engine):
    kind = "transformers"

    @property
    def model_id(self) -> str:
        return bundled_model_id(self.config.model) or super().model_id

    def load(self) -> None:
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise EngineError(INSTALL_HINT) from exc
        self.torch = torch
        device = self.config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        if self.config.dtype == "auto":
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        else:
            dtype = getattr(torch, self.config.dtype)
        path = resolve_model(self.config.model)
        revision = self.config.revision if not os.path.isdir(path) else None
        self.tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype,
                                                          **self.config.options).to(device)
        self.model.eval()
        torch.manual_seed(self.config.seed)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self._grammars: dict[str, Any] = {}
        self._compiler = None
        self._queue: list[tuple[list[Message], Sampling, Future]] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="transformers-engine", daemon=True)
        self._thread.start()

    # -- guided JSON ---------------------------------------------------------------------------------
    def _grammar(self, schema: dict[str, Any]) -> Any:
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            try:
                import xgrammar as xgr
            except ImportError as exc:
                raise EngineError("guided JSON on the transformers engine needs xgrammar (pip install "
                                  "xgrammar; vLLM ships it)") from exc
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.model.config.vocab_size,
                                                          stop_token_ids=sorted(i for i in self.eos_ids if i is not None))
                self._compiler = xgr.GrammarCompiler(info)
            self._grammars[key] = self._compiler.compile_json_schema(schema, any_whitespace=False)
        return self._grammars[key]

    def _logits_processors(self, sp: Sampling, batch: int) -> list[Any]:
        if sp.json_schema is None:
            return []
        from xgrammar.contrib.hf import LogitsProcessor

        return [LogitsProcessor([self._grammar(sp.json_schema)] * batch)]

    # -- batches ---------------------------------------------------------------------------------------
    def _gen_kwargs(self, sp: Sampling) -> dict[str, Any]:
        kw: dict[str, Any] = dict(max_new_tokens=sp.max_tokens, repetition_penalty=sp.repetition_penalty,
                                  pad_token_id=self.tokenizer.pad_token_id)
        if sp.temperature > 0:
            kw.update(do_sample=True, temperature=sp.temperature, top_p=sp.top_p, top_k=0)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def _batch(self, chats: list[list[Message]], sp: Sampling, seeds: set[int | None]) -> list[Generation]:
        torch = self.torch
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        if len(seeds) == 1 and None not in seeds:
            torch.manual_seed(seeds.pop())
        processors = self._logits_processors(sp, len(chats))
        with torch.inference_mode():
            out = self.model.generate(**enc, **self._gen_kwargs(sp),
                                      **({"logits_processor": processors} if processors else {}))
        prompt_len = enc["input_ids"].shape[1]
        gens = []
        for row, mask in zip(out, enc["attention_mask"], strict=True):
            new = row[prompt_len:].tolist()
            n = next((i for i, t in enumerate(new) if t in self.eos_ids), None)
            tokens = new if n is None else new[:n]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            reason = "stop" if n is not None else ("length" if len(tokens) >= sp.max_tokens else "stop")
            cut = min((text.index(s) for s in sp.stop or () if s in text), default=None)
            if cut is not None:
                text, reason = text[:cut], "stop"
                tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            gens.append(Generation(text=text, prompt_tokens=int(mask.sum()), completion_tokens=len(tokens),
                                   finish_reason=reason, model=self.model_id))
        return gens

    def _take(self) -> list[tuple[list[Message], Sampling, Future]] | None:
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            key = _group_key(self._queue[0][1])
            batch, rest = [], []
            for item in self._queue:
                if len(batch) < self.config.batch_size and _group_key(item[1]) == key:
                    batch.append(item)
                else:
                    rest.append(item)
            self._queue = rest
        return [item for item in batch if item[2].set_running_or_notify_cancel()]

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            if not batch:
                continue
            try:
                gens = self._batch([c for c, _, _ in batch], batch[0][1], {sp.seed for _, sp, _ in batch})
            except BaseException as exc:  # noqa: BLE001 - delivered to each request of the batch
                for _, _, fut in batch:
                    fut.set_exception(exc)
                continue
            for (_, _, fut), g in zip(batch, gens, strict=True):
                fut.set_result(g)

    def _enqueue(self, items: list[tuple[list[Message], Sampling]]) -> list[Future]:
        futures = [Future() for _ in items]
        with self._cv:
            if self._closed:
                raise EngineClosed("the transformers engine is closed")
            self._queue.extend((c, sp, f) for (c, sp), f in zip(items, futures, strict=True))
            self._cv.notify()
        return futures

    def _submit(self, chat: list[Message], sampling: Sampling) -> Future:
        return self._enqueue([(chat, sampling)])[0]

    def generate(self, chats: list[list[Message]], sampling: Sampling | list[Sampling]) -> list[Generation]:
        # One call's requests enter the queue together, so they share batches as with a plain batch call.
        flat_chats, flat_params = expand(chats, sampling)
        if not flat_chats:
            return []
        labels = [self.meter.start(sp) for sp in flat_params]
        futures = self._enqueue(list(zip(flat_chats, flat_params, strict=True)))
        for label, fut in zip(labels, futures, strict=True):
            fut.add_done_callback(lambda f, label=label: self.meter.finish(label, f))
        return wait_all(futures)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            pending, self._queue = self._queue, []
            self._cv.notify_all()
        for _, _, fut in pending:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineClosed("the transformers engine was closed with the request queued"))
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(timeout=60)
        self.model = None
