"""Where two checkpoints' lineages part, in-process (tests/e2e/test_timelines.py moves
timelines aside by it in real runs)."""

from dcgan.run import timelines


def test_parting_step_of_two_lineages():
    a = [["a", 0]]
    b = [["a", 0], ["b", 5]]
    c = [["a", 0], ["c", 10]]
    assert timelines.parting_step(a, b) == 5 and timelines.parting_step(b, a) == 5
    assert timelines.parting_step(b, c) == 5
    assert timelines.parting_step(a, [["x", 0]]) == 0  # another run's checkpoint: nothing shared
    assert timelines.parting_step(b, b) == float("inf") and timelines.parting_step(None, b) == float("inf")
    assert [timelines.timeline_at(c, s) for s in (1, 10, 11)] == ["a", "a", "c"]
