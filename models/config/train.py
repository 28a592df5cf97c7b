from __future__ import annotations

from pydantic import Field

from models.base import Strict


class TrainConfig(Strict):
    enabled: bool = Field(False, description="end build_dataset with fine-tuning and evaluation")
