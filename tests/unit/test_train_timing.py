"""The whole run's seconds and tokens/s across the segments a stop and --resume cut it into (issue 21)."""

import json
import time

import pytest

from moesaic.train.timing import SEGMENT_KEYS, RunClock, check_segments


def test_segments_join_and_the_summary_is_the_whole_run():
    first = RunClock([], start_step=0, tokens_per_step=100, world_size=2)
    assert first.segments(0) == [] and first.summary(0)["segments"] == []
    time.sleep(0.05)
    saved = json.loads(json.dumps(first.segments(3)))  # as a checkpoint's client state holds it
    (seg,) = saved
    assert sorted(seg) == sorted(SEGMENT_KEYS)
    assert (seg["first_step"], seg["last_step"], seg["steps"], seg["tokens"], seg["world_size"]) == (1, 3, 3, 300, 2)
    assert seg["seconds"] >= 0.05 and seg["tokens_per_s"] == pytest.approx(300 / seg["seconds"])

    second = RunClock(saved, start_step=3, tokens_per_step=50, world_size=1)  # resumed under one process
    time.sleep(0.02)
    whole = second.summary(5)
    a, b = whole["segments"]
    assert a == seg and (b["first_step"], b["last_step"], b["steps"], b["tokens"], b["world_size"]) == (4, 5, 2, 100, 1)
    assert whole["seconds"] == pytest.approx(a["seconds"] + b["seconds"]) and b["seconds"] >= 0.02
    assert whole["tokens_per_s"] == pytest.approx(400 / whole["seconds"])
    assert second.earlier == saved and second.summary(3)["segments"] == [seg]  # no step yet: no second segment


@pytest.mark.parametrize("bad", [
    3,
    [{"first_step": 1}],
    [{"first_step": 1, "last_step": 3, "steps": 2, "seconds": 1.0, "tokens": 3, "tokens_per_s": 3.0, "world_size": 1}],
    [{"first_step": 1, "last_step": 3, "steps": 3, "seconds": -1.0, "tokens": 3, "tokens_per_s": 3.0, "world_size": 1}],
    [{"first_step": "1", "last_step": 3, "steps": 3, "seconds": 1.0, "tokens": 3, "tokens_per_s": 3.0,
      "world_size": 1}],
])
def test_segments_from_a_checkpoint_are_checked(bad):
    with pytest.raises(ValueError, match=r"^the checkpoint in x: (segments\[0\]|'segments' must be a list)"):
        check_segments(bad, "the checkpoint in x")
    assert check_segments(None, "x") == []  # a checkpoint written before segments were recorded
