"""Fixed framing of every rtns model and the typed runtime settings.

All models run at 16 kHz on 32 ms blocks advanced by 8 ms: these numbers are fixed by
training (DTLN, see shared/MODELS.md) and shared by every family so one engine serves all.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

SAMPLE_RATE = 16_000
#: 32 ms analysis block at 16 kHz.
BLOCK_LEN = 512
#: 8 ms hop: each model call consumes this many new samples and emits as many.
BLOCK_SHIFT = 128
#: rfft bins of one block.
N_BINS = BLOCK_LEN // 2 + 1


class FrameSpec(BaseModel):
    """Framing a pack was trained with; the engine refuses any other."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sample_rate: int = Field(SAMPLE_RATE, gt=0)
    block_len: int = Field(BLOCK_LEN, gt=0)
    block_shift: int = Field(BLOCK_SHIFT, gt=0)


class EngineConfig(BaseModel):
    """Runtime knobs of one loaded model (not part of the pack)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: onnxruntime intra-op threads; one is best for a single stream of 8 ms hops.
    threads: int = Field(1, ge=1, le=64)
