"""`bench/audit.py`'s figures: each flow against the loops around it, the cold run apart from the warm."""

from __future__ import annotations

import pytest
from benches import load_bench


def test_each_flow_is_divided_by_the_mean_of_the_loops_around_it() -> None:
    bench = load_bench("audit")
    assert bench.flow_ratios([12.0, 11.0, 10.0], [10.0, 10.0, 12.0, 8.0]) == pytest.approx([1.2, 1.0, 1.0])
    with pytest.raises(ValueError, match="2 flows need 3 loops"):
        bench.flow_ratios([1.0, 1.0], [1.0, 1.0])


def test_the_warm_figure_leaves_out_the_cold_first_run() -> None:
    bench = load_bench("audit")
    assert bench.warm_median([1.30, 1.10, 1.00, 1.20]) == pytest.approx(1.10)
    assert bench.warm_median([1.30, 1.10, 1.00]) == pytest.approx(1.05)
    assert bench.warm_median([1.30]) == pytest.approx(1.30)  # one repeat: the cold run is all there is
