"""Typed runtime settings of a loaded model.

The framing (16 kHz, 512/128 and what derives from them) lives in :mod:`rtns.framing`, and
is imported from there only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["EngineConfig"]


class EngineConfig(BaseModel):
    """Runtime knobs of one loaded model (not part of the pack)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: onnxruntime intra-op threads; one is best for a single stream of 8 ms hops.
    threads: int = Field(1, ge=1, le=64)
