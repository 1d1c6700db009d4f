"""mobalab.bench._interleaved: the alternating order of the A/B scripts' rounds and the dropped first rounds."""

from mobalab.bench._interleaved import interleaved_times


def test_arms_alternate_and_the_first_rounds_are_dropped():
    calls = []

    def timer(arm):
        calls.append(arm)
        return float(len(calls))

    times = interleaved_times({"a": "a", "b": "b", "c": "c"}, rounds=4, timer=timer, drop=2)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]
    assert times == {"a": [7.0, 12.0], "b": [8.0, 11.0], "c": [9.0, 10.0]}
