"""Alarm debounce: N of M to start, K normal frames to end, stable ids (alarms.py)."""

from haloae.edge.alarms import AlarmTracker
from haloae.edge.config import AlarmConfig


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def feed(tracker, verdicts, start_id=0, clock=None):
    events = []
    for i, v in enumerate(verdicts):
        if clock:
            clock.t += 1.0
        events += tracker.update(bool(v), 0.9 if v else 0.1, start_id + i, 1000.0 + start_id + i, 0.5)
    return events


def test_starts_only_with_n_of_the_last_m_frames():
    t = AlarmTracker("n1", "cam0", AlarmConfig(n=3, m=5, clear_frames=3, update_interval_s=1e9))
    assert feed(t, [1, 0, 1, 0, 0, 1, 0, 0]) == []      # never 3 in any 5
    assert feed(t, [1], start_id=8) == []                # last 5: 0 1 0 0 1
    (ev,) = feed(t, [1], start_id=9)                     # last 5: 1 0 0 1 1 -> 3 of 5
    assert ev.kind == "start" and ev.frame_id == 9 and ev.seq == 0 and ev.anomalous_frames == 3
    assert t.active_id == ev.id


def test_hysteresis_ends_after_clear_frames_in_a_row_only():
    t = AlarmTracker("n1", "cam0", AlarmConfig(n=2, m=3, clear_frames=3, update_interval_s=1e9))
    (start,) = feed(t, [1, 1])
    assert feed(t, [0, 0, 1, 0, 0, 1, 0, 0], start_id=2) == []   # isolated good frames do not end it
    (end,) = feed(t, [0], start_id=10)                            # third normal frame in a row
    assert end.kind == "end" and end.id == start.id and end.payload()["reason"] == "cleared"
    assert end.anomalous_frames == 4 and end.frames == 11 and t.active_id is None
    # a new alarm needs n fresh anomalous frames and gets a new id
    assert feed(t, [1], start_id=11) == []
    (again,) = feed(t, [1], start_id=12)
    assert again.kind == "start" and again.id != start.id


def test_updates_are_rate_limited_and_share_the_id_with_increasing_seq():
    clock = Clock()
    t = AlarmTracker("n1", "cam0", AlarmConfig(n=1, m=1, clear_frames=2, update_interval_s=3.0), clock=clock)
    events = feed(t, [1, 1, 1, 1, 1, 1, 1, 0, 0], clock=clock)
    kinds = [e.kind for e in events]
    assert kinds == ["start", "update", "update", "end"]
    assert len({e.id for e in events}) == 1
    assert [e.seq for e in events] == [0, 1, 2, 3]
    p = events[1].payload()
    assert p["v"] == 1 and p["event"] == "update" and p["camera"] == "cam0" and p["node"] == "n1"
    assert p["max_score"] == 0.9 and p["id"].startswith("n1-cam0-")
    assert p["timestamp"].endswith("Z") and p["start_time"] <= p["timestamp"]


def test_close_ends_a_running_alarm_with_a_reason():
    t = AlarmTracker("n1", "cam0", AlarmConfig(n=1, m=1, clear_frames=5, update_interval_s=1e9))
    assert t.close("shutdown") == []
    (start,) = feed(t, [1])
    (end,) = t.close("camera_offline", 2000.0)
    assert end.kind == "end" and end.id == start.id and end.payload()["reason"] == "camera_offline"
    assert t.close("shutdown") == []
