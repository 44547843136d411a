"""The web's recorder: what it reads of the running daemon, without taking from the health loop."""

from __future__ import annotations

from types import SimpleNamespace

from gateway.anomaly.model import ScoreState
from gateway.web.view import Recorder


def scored(state: ScoreState, *latencies: float) -> None:
    """Windows scored as DeviceScorer.step records them."""
    for us in latencies:
        state.latency_us.append(us)
        state.recent_us.append(us)
        state.timed += 1


def test_the_recorder_sees_every_window_even_when_the_health_loop_takes_the_list_first():
    state = ScoreState()
    scorer = SimpleNamespace(state=state, errors=None, model=SimpleNamespace(name="m"))
    runner = SimpleNamespace(name="pump1", scoring=SimpleNamespace(scorer=scorer, threshold=1.0),
                             health=SimpleNamespace(polls=0, errors=0), skipped_ticks=0, dropped=0)
    rec = Recorder(SimpleNamespace(devices=[runner]))  # type: ignore[arg-type]
    for second in range(5):
        scored(state, 40.0 + second, 50.0 + second)
        state.latency_us = []  # the health loop takes its list just before each tick (same period, phase-locked)
        rec.tick(now=1000.0 + second, watched=False)
    assert sorted(rec.recent) == sorted([40.0 + s for s in range(5)] + [50.0 + s for s in range(5)])
    rec.tick(now=1006.0, watched=False)  # nothing new: nothing counted twice
    assert len(rec.recent) == 10
    # a new scorer (the device restarted): its windows count from 0 again
    fresh = ScoreState()
    scored(fresh, 7.0)
    scorer.state = fresh
    rec.tick(now=1007.0, watched=False)
    assert list(rec.recent)[-1] == 7.0 and len(rec.recent) == 11
