from __future__ import annotations

from pydantic import Field

from models.base import Strict


class FilterConfig(Strict):
    enabled: bool = Field(True, description="run the filter chain; off keeps every parsed turn")
