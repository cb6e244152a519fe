"""benchmarks/mask_postfilter.py: the post-filter's gain rule, and the probe's hop loop equal
to the engine's own path at beta 0."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from bench_helpers import load_benchmark

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        yield load_benchmark("mask_postfilter")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_scale_is_one_at_beta_zero_and_at_unit_gain(probe):
    g = np.array([0.0, 0.1, 0.5, 1.0, 1.3], np.float32)
    np.testing.assert_array_equal(probe.postfilter_scale(g, 0.0), np.ones(5, np.float32))
    s = probe.postfilter_scale(g, 0.02)
    assert s[3] == pytest.approx(1.0, abs=1e-7) and s[4] == 1.0


def test_filtered_gain_is_below_and_rises_with_the_gain(probe):
    g = np.linspace(0.01, 0.99, 99).astype(np.float32)
    for beta in (0.01, 0.02, 0.1):
        filtered = g * probe.postfilter_scale(g, beta)
        assert np.all(filtered < g)
        assert np.all(np.diff(filtered) > 0)
    # the closed form at G = 0.5: sin(pi/4)^2 = 1/2, so G'/G = (1 + b) / (1 + 2 b)
    half = probe.postfilter_scale(np.array([0.5], np.float32), 0.02)[0]
    assert half == pytest.approx(1.02 / 1.04, rel=1e-6)


def test_hop_loop_equals_the_engine_at_beta_zero(probe):
    from rtns.engine import Model

    rng = np.random.default_rng(3)
    x = (0.1 * rng.standard_normal(16_000 + 77)).astype(np.float32)
    model, set_beta = probe.filtered_model("rtns-gtcrn")
    set_beta(0.0)
    plain = probe.engine_unlimited(Model("rtns-gtcrn"), x)
    np.testing.assert_array_equal(probe.enhance(model, x), plain)
    set_beta(0.04)
    y = probe.enhance(model, x)
    assert y.shape == x.shape and not np.array_equal(y, plain)
