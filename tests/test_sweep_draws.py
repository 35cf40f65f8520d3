"""`bench/sweep.py`'s worlds: a pure function of the seed, spread over whichever tiny CLIPs are given."""

from __future__ import annotations

from benches import load_bench


def test_the_worlds_are_the_seeds_and_spread_over_the_clips_given() -> None:
    sweep = load_bench("sweep")
    three = sweep.draw_worlds(29, 6, 2, (0, 1, 2))
    assert three == sweep.draw_worlds(29, 6, 2, (0, 1, 2))
    assert [d.name for d in three] == [
        *(f"b{i:02d}" for i in range(6)),
        "c00",
        "c01",
        *(f"demo{part}-clip{s}" for s in range(3) for part in ("", "-control")),
    ]
    assert [d.clip_seed for d in three[:8]] == [0, 1, 2, 0, 1, 2, 0, 1]
    for d in three[:6]:
        assert 1 <= len(d.biases) <= 2
        assert all(0.9 <= float(b.rsplit("@", 1)[1]) <= 1.0 for b in d.biases)
    # One CLIP (a quick look on a single tiny CLIP): the same worlds, all on it.
    one = sweep.draw_worlds(29, 6, 2, (7,))
    assert {d.clip_seed for d in one} == {7}
    assert [d.biases for d in one[:8]] == [d.biases for d in three[:8]]
