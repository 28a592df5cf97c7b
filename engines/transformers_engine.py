"""Plain transformers generation: the fallback where vLLM is unavailable, and the reference for tests.

Chats go through the tokenizer's chat template, are left-padded and generated in batches of
`config.batch_size`. Requests with different sampling settings are batched separately (one
`generate()` call takes one generation config); temperature 0 means greedy decoding.

Stop strings are applied after decoding (HF `stop_strings` re-scans the whole vocabulary on every
call, slower than the tokens it saves for short answers); completion_tokens then counts the kept text.

Seeding: the engine seeds torch with `config.seed` at load; a batch whose requests all carry the same
`Sampling.seed` is re-seeded with it, so the same prompts, seed and batch give the same text.

Guided JSON is emulated, not enforced: `Sampling.json_schema` is ignored while decoding, and the
caller validates the text against the schema and resamples when it does not parse (the query stage
does this anyway, because the paper keeps only format-valid outputs).
"""

from __future__ import annotations

import os
from typing import Any

from engines.base import Engine, EngineError, Generation, Message, Sampling
from engines.bundled import bundled_model_id, resolve_model

INSTALL_HINT = "transformers and torch are needed: pip install torch transformers"


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
        with torch.inference_mode():
            out = self.model.generate(**enc, **self._gen_kwargs(sp))
        prompt_len = enc["input_ids"].shape[1]
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        gens = []
        for row, mask in zip(out, enc["attention_mask"], strict=True):
            new = row[prompt_len:].tolist()
            n = next((i for i, t in enumerate(new) if t in eos_ids), None)
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

    def _generate(self, chats: list[list[Message]], sampling: list[Sampling]) -> list[Generation]:
        groups: dict[str, list[int]] = {}
        for i, sp in enumerate(sampling):
            groups.setdefault(sp.model_copy(update={"seed": None}).key(), []).append(i)
        out: list[Generation | None] = [None] * len(chats)
        bs = self.config.batch_size
        for idx in groups.values():
            for start in range(0, len(idx), bs):
                part = idx[start:start + bs]
                gens = self._batch([chats[i] for i in part], sampling[part[0]], {sampling[i].seed for i in part})
                for i, g in zip(part, gens, strict=True):
                    out[i] = g
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.model = None
