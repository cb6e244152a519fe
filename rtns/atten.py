"""The attenuation limit: at most this many dB of noise removal, or none.

One type for every place that takes, stores or sends a limit: the CLI options
(``--atten-lim 18`` / ``off``), the run-time controls, pack manifests (``atten_lim_db``,
``null`` = off), the daemon's wire protocol (a number or ``"off"``) and the trainer's dry
mix. The limit is applied as a mix ``g * dry + (1 - g) * enhanced`` with
``g = 10^(-dB/20)``, which bounds the attenuation of any component at ``dB``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

#: The largest finite limit anyone may set; 200 dB is far below float32 resolution of a
#: dry mix already, so anything larger is a typo for "off".
MAX_DB = 200.0
#: Words accepted for "no limit". Not "inf": typed as a number, infinity (or a number that
#: overflows to it, 1e400) is refused like any other out-of-range value.
OFF_WORDS = frozenset({"off", "none", "unlimited"})


class AttenLimitError(ValueError):
    """A value that is not a limit; the message is one sentence."""


@dataclass(frozen=True)
class AttenLimit:
    """``db`` in [0, MAX_DB], or ``math.inf`` for no limit (:data:`OFF`)."""

    db: float

    def __post_init__(self) -> None:
        db = self.db
        if isinstance(db, bool) or not isinstance(db, int | float):
            raise AttenLimitError(f"attenuation limit must be a number of dB, got {db!r}")
        if math.isnan(db) or db < 0 or (db > MAX_DB and not math.isinf(db)):
            raise AttenLimitError(
                f"attenuation limit must be 0..{MAX_DB:g} dB or 'off', got {db:g}"
            )
        object.__setattr__(self, "db", float(db) + 0.0)  # + 0.0: -0 is 0 dB

    # -- constructors ------------------------------------------------------------------
    @classmethod
    def parse(cls, value: AttenLimit | str | float | int) -> AttenLimit:
        """From text ('18', '18 dB', 'off'), a number (inf = off) or an AttenLimit."""
        if isinstance(value, AttenLimit):
            return value
        if isinstance(value, str):
            text = value.strip().lower().removesuffix("db").strip()
            if text in OFF_WORDS:
                return OFF
            try:
                number = float(text)
            except ValueError:
                raise AttenLimitError(
                    f"attenuation limit must be a number of dB or 'off', got {value!r}"
                ) from None
            if not math.isfinite(number):
                raise AttenLimitError(
                    f"attenuation limit must be 0..{MAX_DB:g} dB or 'off', got {value.strip()!r}"
                )
            return cls(number)
        return cls(value)

    @classmethod
    def from_optional(cls, db: float | None) -> AttenLimit:
        """From a manifest / Ready field: None means no limit."""
        return OFF if db is None else cls(db)

    # -- encodings -----------------------------------------------------------------------
    @property
    def off(self) -> bool:
        return math.isinf(self.db)

    @property
    def dry_gain(self) -> float:
        """g of the dry mix; 0.0 when off, 1.0 at 0 dB (the output is the input)."""
        return 0.0 if self.off else float(10.0 ** (-self.db / 20.0))

    def optional(self) -> float | None:
        """For a manifest or Ready field: None when off."""
        return None if self.off else self.db

    def wire(self) -> float | Literal["off"]:
        """For JSON (which has no infinity): the number, or "off"."""
        return "off" if self.off else self.db

    def __str__(self) -> str:
        return "off" if self.off else f"{self.db:g} dB"


OFF = AttenLimit(math.inf)
