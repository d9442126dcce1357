"""The benchmark report's arithmetic (no benchmark runs here): the time cell with the rounds'
range, and exact / first order as the median of same-round ratios."""

from __future__ import annotations

import doctest

import benchmarks.__main__ as report


def test_doctests() -> None:
    assert doctest.testmod(report).failed == 0


def test_map_ratio_pairs_rounds_and_falls_back_to_medians() -> None:
    # full fine-tuning's noise moves both maps' ratios together in a round: pairing cancels it
    exact = {"time": 1.10, "time_rounds": [1.02, 1.10, 1.21, 1.06]}
    first = {"time": 1.04, "time_rounds": [1.00, 1.08, 1.19, 1.04]}
    paired = report._map_ratio(exact, first)
    assert paired is not None and abs(paired - 1.0188) < 1e-3  # median of 1.02, 1.0185, …
    assert report._map_ratio({"time": 1.5}, {"time": 1.0}) == 1.5  # older JSON: no rounds
    assert report._map_ratio({"time": 1.5, "time_rounds": [1.5]}, {"time": 1.0}) == 1.5
    assert report._map_ratio({"time": None}, {"time": 1.0}) is None


def test_time_cell_and_render_flag_on_paired_ratio() -> None:
    assert report._time_cell({"time": 1.07, "time_rounds": [1.05, 1.16, 1.07]}) == (
        "1.07 (1.05–1.16)")
    assert report._time_cell({"time": 1.07}) == "1.07"
    rows = {
        "full fine-tuning": {"time": 1.0, "time_rounds": [1.0, 1.0], "note": ""},
        "LieRA lora exact": {"time": 1.09, "time_rounds": [1.0, 1.2], "note": "",
                             "trainable_frac": 0.02},
        "LieRA lora first order": {"time": 1.02, "time_rounds": [1.0, 1.12], "note": "",
                                   "trainable_frac": 0.02},
    }
    meta = {"torch": "t", "cpu": "c", "threads": 1, "cpus": 2, "rounds": 2,
            "steps_per_round": 2, "dtype": "float32", "rank": 8, "optimizer": "SGD",
            "load_avg_start": [1.0], "load_avg_end": [1.0]}
    md = report.render(meta, {"case": {"label": "L", "rows": rows, "stress": False}})
    assert "1.09 (1.00–1.20)" in md
    # the ratio of medians (1.069) would fail the 1.05 limit; the paired rounds give 1.036
    assert "lora 1.036" in md and "all met." in md
