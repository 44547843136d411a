"""Training's treatment of commissioning data that made models deaf, in-process (no TensorFlow): a tag read coarser
than it varies (a whole-degree register), and glitches (a poll read as 0)."""

from __future__ import annotations

import numpy as np

from gateway.anomaly.training import _coarse, _drop_glitches, _fit_stats, _glitches, _scales


def rig(rows=1200, seed=3):
    """Three noisy tags and an oil temperature of 45 ± 0.2 °C read in whole degrees: one value in 99 % of rows."""
    rng = np.random.default_rng(seed)
    x = np.asarray([2.0, 11.0, 3.5, 45.0]) + np.asarray([0.3, 0.2, 0.05, 0.2]) * rng.normal(size=(rows, 4))
    x[:, 3] = np.round(x[:, 3])
    return x


def test_a_tag_read_coarser_than_it_varies_is_said_and_one_step_is_its_normal_spread():
    grids, drift = [rig()], [False] * 4
    center, spread = _scales(grids, drift, 60.0, 1.0)
    assert spread[3] == 1.0  # one step (its few steps alone gave about 0.13: a step counted as 7 spreads)
    assert (spread[:3] == _scales([grids[0][:, :3]], drift[:3], 60.0, 1.0)[1]).all()  # the others as they were
    assert _coarse(["vibration", "current", "pressure", "oil_temp"], grids) == {"oil_temp": (0.99, 1.0)}
    stats = _fit_stats(grids, center, spread, drift, 60.0, 1.0, 30)
    off = np.asarray(stats["off_subspace"])
    assert not off[3].any() and not off[:, 3].any()  # its steps are not the subspace's smallest variance
    assert stats["residual_scale"][3] == 1.0  # noisier only when it moves a step every sample
    assert max(stats["residual_scale"][:3]) < 1.2  # the others' mean |one-step change|, about 2/sqrt(pi)


def test_a_tag_that_moves_through_its_values_is_not_coarse():
    x = rig()
    x[:, 3] = np.round(45.0 + 2.0 * np.random.default_rng(4).normal(size=len(x)))  # ±2 °C in whole degrees
    center, spread = _scales([x], [False] * 4, 60.0, 1.0)
    assert spread[3] == _scales([x[:, 3:]], [False], 60.0, 1.0)[1][0] > 1.0
    assert _coarse(["a", "b", "c", "oil_temp"], [x]) == {}


def test_a_tag_that_changed_only_across_gaps_has_no_step_and_keeps_its_spread():
    x = rig()
    x[:, 3] = 45.0
    x[1150:1170, 3] = np.nan  # a gap longer than the forward fill, after which the reading is one degree higher
    x[1170:, 3] = 46.0
    center, spread = _scales([x], [False] * 4, 60.0, 1.0)
    assert 0 < spread[3] < 1.0 and _coarse(["a", "b", "c", "oil_temp"], [x]) == {}
    stats = _fit_stats([x], center, spread, [False] * 4, 60.0, 1.0, 30)
    assert np.isfinite(stats["residual_scale"]).all() and min(stats["residual_scale"]) >= 1e-3


def test_a_glitch_is_a_reading_or_three_far_from_the_readings_on_either_side_and_rare():
    y = 3.5 + 0.05 * np.random.default_rng(5).normal(size=1200)
    assert not _glitches(y).any()  # noise alone
    g = y.copy()
    g[500], g[800:802] = 0.0, 655.35  # a poll read as 0; two at the register's top
    assert list(np.nonzero(_glitches(g))[0]) == [500, 800, 801]
    g = y.copy()
    g[600:] += 2.0  # a step that stays is the machine, not a glitch
    g[900:904] = 0.0  # four readings of 0 are more than a glitch
    assert not _glitches(g).any()
    g = np.round(45.0 + 0.2 * np.random.default_rng(6).normal(size=1200))  # whole degrees: its steps are one
    g[300] = 0.0
    assert list(np.nonzero(_glitches(g))[0]) == [300]
    g = y.copy()
    g[::50] = 0.0  # one reading in 50: the tag's nature, kept
    assert not _glitches(g).any()


def test_glitches_become_missing_values_with_their_time_and_reading():
    x = rig()
    x[500, 2] = 0.0
    x[700, 2] = np.nan  # a missing value next to nothing unusual stays missing, and is no glitch
    times = 1.79e9 + np.arange(len(x), dtype=float)
    found = _drop_glitches(["vibration", "current", "pressure", "oil_temp"], [(times, x)])
    assert np.isnan(x[500, 2]) and np.isnan(x[:, 2]).sum() == 2
    assert found == {"pressure": [(1.79e9 + 500, 0.0)]}
