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
        ("inf", math.inf),
        ("200", 200.0),
    ],
)
def test_parse(text, db):
    assert AttenLimit.parse(text).db == db


@pytest.mark.parametrize("bad", ["-1", "nan", "201", "1e300", "x", "", True])
def test_one_bound_everywhere(bad):
    with pytest.raises(AttenLimitError):
        AttenLimit.parse(bad)


def test_encodings():
    lim = AttenLimit(20)
    assert lim.dry_gain == pytest.approx(0.1)
    assert lim.wire() == 20.0 and lim.optional() == 20.0 and str(lim) == "20 dB"
    assert OFF.wire() == "off" and OFF.optional() is None and OFF.dry_gain == 0.0
    assert str(OFF) == "off" and AttenLimit.parse(math.inf) == OFF
    assert AttenLimit.from_optional(None) == OFF and AttenLimit(0).dry_gain == 1.0
    assert AttenLimit.parse(OFF.wire()) == OFF
    assert MAX_DB == 200.0
