"""One generation interface, a registry of engines: vllm, openai, transformers."""

from engines.base import (
    Engine,
    EngineError,
    Generation,
    Message,
    Sampling,
    TransientEngineError,
    get_engine,
    is_transient,
    register_engine,
)

__all__ = ["Engine", "EngineError", "Generation", "Message", "Sampling", "TransientEngineError",
           "get_engine", "is_transient", "register_engine"]
