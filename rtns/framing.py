"""The framing every rtns model runs with, and what derives from it.

Every model here is trained at 16 kHz on 32 ms blocks advanced by 8 ms (DTLN's framing,
see shared/MODELS.md; FRCRN and GTCRN packs reuse it so one engine serves every family).
A pack records its framing in ``manifest.json`` (:class:`FrameSpec`); the engine runs what
the manifest says and refuses what it cannot honour.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Rate every model is trained at; audio at any other rate is resampled to it, never the
#: model run at the audio's rate (a 16 kHz model fed 8 kHz audio hears everything an
#: octave high).
SAMPLE_RATE = 16_000
#: Analysis block: 32 ms at 16 kHz (DTLN's block; one rfft per block).
BLOCK_LEN = 512
#: Hop: each model call consumes this many new samples and emits as many (8 ms at 16 kHz).
BLOCK_SHIFT = 128
#: rfft bins of one block (DC to Nyquist).
N_BINS = BLOCK_LEN // 2 + 1
#: Algorithmic latency in samples: output sample n estimates input sample n - 384. The
#: overlap-add of a block is complete once its last hop has arrived, so the oldest sample
#: of the newest block leaves block_len - block_shift samples after it entered.
LATENCY_SAMPLES = BLOCK_LEN - BLOCK_SHIFT
#: The same in milliseconds (24.0 ms); computation and device buffers come on top.
LATENCY_MS = 1000.0 * LATENCY_SAMPLES / SAMPLE_RATE
#: Largest block a pack may declare: one second at 16 kHz. Far above any streaming model,
#: it keeps a hostile manifest from sizing the engine's buffers.
MAX_BLOCK_LEN = SAMPLE_RATE


class FrameSpec(BaseModel):
    """Framing a pack was trained with; the engine runs exactly this or refuses the pack.

    The checks here are the ones every framing must pass for the engine's overlap-add:
    an even block (rfft bins ``block_len // 2 + 1``) that is a whole number of hops.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sample_rate: int = Field(SAMPLE_RATE, gt=0)
    block_len: int = Field(BLOCK_LEN, gt=0, le=MAX_BLOCK_LEN)
    block_shift: int = Field(BLOCK_SHIFT, gt=0)

    @model_validator(mode="after")
    def _honoured(self) -> FrameSpec:
        if self.sample_rate != SAMPLE_RATE:
            raise ValueError(
                f"sample_rate is {self.sample_rate} Hz but every rtns model runs at "
                f"{SAMPLE_RATE} Hz (audio is resampled to the model, not the model to the audio)"
            )
        if self.block_len % 2:
            raise ValueError(f"block_len must be even for the rfft, got {self.block_len}")
        if self.block_len % self.block_shift:
            raise ValueError(
                f"block_len {self.block_len} must be a multiple of block_shift "
                f"{self.block_shift} for the overlap-add"
            )
        return self

    @property
    def n_bins(self) -> int:
        """rfft bins of one block."""
        return self.block_len // 2 + 1

    @property
    def latency_samples(self) -> int:
        """Algorithmic latency this framing implies (see :data:`LATENCY_SAMPLES`)."""
        return self.block_len - self.block_shift

    @property
    def latency_ms(self) -> float:
        """Algorithmic latency in milliseconds."""
        return 1000.0 * self.latency_samples / self.sample_rate
