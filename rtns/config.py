"""Typed runtime settings, and the framing names other modules still import from here.

The framing (16 kHz, 512/128 and what derives from them) lives in :mod:`rtns.framing`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from rtns.framing import BLOCK_LEN, BLOCK_SHIFT, N_BINS, SAMPLE_RATE, FrameSpec

__all__ = ["BLOCK_LEN", "BLOCK_SHIFT", "N_BINS", "SAMPLE_RATE", "EngineConfig", "FrameSpec"]


class EngineConfig(BaseModel):
    """Runtime knobs of one loaded model (not part of the pack)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: onnxruntime intra-op threads; one is best for a single stream of 8 ms hops.
    threads: int = Field(1, ge=1, le=64)
