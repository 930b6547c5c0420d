"""Results over seeds: the t interval against a hand computation, claims, seed lists."""

import math

import numpy as np
import pytest

from gesim.claims import Holds, holds, parse_seeds, spread
from gesim.errors import GesimError


def test_spread_matches_hand_computed_t_interval():
    # values 1, 2, 3: mean 2, s = 1; with 2 degrees of freedom the t quantile has the closed
    # form t_p = (2p - 1) / sqrt(2 p (1 - p)), so half = t_{0.975} / sqrt(3).
    s = spread([1.0, 2.0, 3.0])
    half = (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025) / math.sqrt(3)
    assert s.mean == 2.0 and s.n == 3
    assert s.lo == pytest.approx(2 - half, abs=1e-12) and s.hi == pytest.approx(2 + half, abs=1e-12)


def test_spread_interval_covers_the_mean_at_its_level():
    # Monte Carlo coverage of the 95% interval for normal samples of 5: within 2 points of 0.95.
    rng = np.random.default_rng(0)
    inside = 0
    for _ in range(4000):
        s = spread(rng.normal(1.0, 2.0, 5))
        inside += s.lo <= 1.0 <= s.hi
    assert abs(inside / 4000 - 0.95) < 0.02


def test_spread_one_seed_has_no_interval_and_nan_is_refused():
    s = spread([0.5])
    assert s.mean == 0.5 and math.isnan(s.lo) and math.isnan(s.hi)
    with pytest.raises(GesimError, match="diverged"):
        spread([1.0, float("nan")])
    with pytest.raises(GesimError):
        spread([])


def test_holds_counts_seeds():
    h = holds([-0.1, 0.2, -0.3], lambda v: v < 0)
    assert (h.k, h.n, str(h), h.always) == (2, 3, "2/3", False)


@pytest.mark.parametrize(
    "text, seeds",
    [("0-3", (0, 1, 2, 3)), ("0,3,7", (0, 3, 7)), ("0-2,10", (0, 1, 2, 10)), ("1,1,0-1", (1, 0)), ("5", (5,))],
)
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "a", "3-1", "-1", "0-x", ","])
def test_parse_seeds_refuses_bad_lists(text):
    with pytest.raises(GesimError):
        parse_seeds(text)


def test_holds_round_trips_through_its_dict_and_refuses_a_wrong_count():
    h = holds([1, 0, 1])
    assert Holds.from_dict(h.as_dict()) == h and str(h) == "2/3"
    with pytest.raises(GesimError, match="per-seed flags give 2/3"):
        Holds.from_dict({"k": 3, "n": 3, "per_seed": [True, False, True]})
