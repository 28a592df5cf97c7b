from __future__ import annotations

from pydantic import Field

from models.base import Strict


class EvalConfig(Strict):
    enabled: bool = Field(True, description="evaluate after training when train.enabled")
