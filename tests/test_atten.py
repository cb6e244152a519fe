"""rtns.atten.AttenLimit: one parse, one bound, every encoding."""

from __future__ import annotations

import math

import pytest

from rtns.atten import MAX_DB, OFF, AttenLimit, AttenLimitError


@pytest.mark.parametrize(
    "text, db",
    [
        ("18", 18.0),
        ("18 dB", 18.0),
        (" 0 ", 0.0),
        ("off", math.inf),
        ("OFF", math.inf),
        ("none", math.inf),
        ("unlimited", math.inf),
        ("-0", 0.0),
        ("200", 200.0),
    ],
)
def test_parse(text, db):
    assert AttenLimit.parse(text).db == db


@pytest.mark.parametrize("bad", ["-1", "nan", "201", "1e300", "x", "", True])
def test_one_bound_everywhere(bad):
    with pytest.raises(AttenLimitError):
        AttenLimit.parse(bad)


@pytest.mark.parametrize("bad", ["inf", "-inf", "Infinity", "1e400", "-1e400"])
def test_infinity_typed_as_a_number_is_refused(bad):
    """Issue 31 (11): 'inf' and '1e400' (which overflows to inf) were silently 'off' while
    1e9 was refused; a number of dB out of 0..200 is refused whatever its size."""
    with pytest.raises(AttenLimitError, match="0..200 dB or 'off'"):
        AttenLimit.parse(bad)


def test_minus_zero_is_zero_db():
    """Issue 31 (11): '-0' printed as '-0 dB'."""
    lim = AttenLimit.parse("-0")
    assert str(lim) == "0 dB" and math.copysign(1.0, lim.db) == 1.0


def test_encodings():
    lim = AttenLimit(20)
    assert lim.dry_gain == pytest.approx(0.1)
    assert lim.wire() == 20.0 and lim.optional() == 20.0 and str(lim) == "20 dB"
    assert OFF.wire() == "off" and OFF.optional() is None and OFF.dry_gain == 0.0
    assert str(OFF) == "off" and AttenLimit.parse(math.inf) == OFF
    assert AttenLimit.from_optional(None) == OFF and AttenLimit(0).dry_gain == 1.0
    assert AttenLimit.parse(OFF.wire()) == OFF
    assert MAX_DB == 200.0
