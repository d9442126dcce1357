"""The benchmark report's arithmetic: the time cell with the rounds' range, exact / first
order as the median of same-round ratios, the compiled columns; and (marked slow) the GPU
benchmark's code run end to end on the CPU."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmarks.__main__ as report

ROOT = Path(__file__).resolve().parents[1]


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


# ------------------------------------------------------------------ compiled rows, gpu.py
def test_render_compiled_columns_and_check() -> None:
    rows = {
        "full fine-tuning": {"time": 1.0, "time_rounds": [1.0, 1.0], "note": "",
                             "compiled": {"time": 1.0, "time_rounds": [1.0, 1.0],
                                          "vs_eager": 0.8, "vs_eager_rounds": [0.8, 0.8],
                                          "compile_steps": 30.0}},
        "LieRA lora exact": {"time": 1.05, "time_rounds": [1.0, 1.1], "note": "",
                             "trainable_frac": 0.02,
                             "compiled": {"time": 1.3, "time_rounds": [1.2, 1.4],
                                          "vs_eager": 1.02, "vs_eager_rounds": [1.0, 1.04],
                                          "compile_steps": 40.0}},
        "LieRA modewise so": {"time": 1.5, "note": "", "trainable_frac": 0.01,
                              "compiled": {"note": "compiled: refused: Unsupported: x"}},
    }
    meta = {"torch": "t", "cpu": "c", "threads": 1, "cpus": 2, "rounds": 2,
            "steps_per_round": 2, "dtype": "float32", "rank": 8, "optimizer": "SGD",
            "load_avg_start": [1.0], "load_avg_end": [1.0], "compiled": True}
    md = report.render(meta, {"case": {"label": "L", "rows": rows, "stress": False}})
    assert "| compiled step time | compiled / eager |" in md
    assert ("| LieRA lora exact | 2.00 % | 1.05 (1.00–1.10) | 1.30 (1.20–1.40) "
            "| 1.02 (1.00–1.04)") in md
    assert "compiled: refused: Unsupported" in md
    assert "30–40 eager full fine-tuning steps" in md
    assert "compiled / eager ≤ 1.00: 1 above:" in md
    assert "LieRA lora exact compiled / eager 1.02 (1.00–1.04), within noise" in md
    # without --compile the table keeps its columns
    plain = report.render(meta | {"compiled": False},
                          {"case": {"label": "L", "rows": rows, "stress": False}})
    assert "| method | trainable | step time | step mem | total mem | note |" in plain
    assert "compiled" not in plain.split("\n", 2)[2]
    assert "force_layout_optimization" not in md
    assert "rerun with --force-layout-opt" in md  # a compiled row above eager, default setting
    forced = report.render(meta | {"force_layout_opt": True},
                           {"case": {"label": "L", "rows": rows, "stress": False}})
    assert "force_layout_optimization=True" in forced.split("\n", 1)[0]
    assert "rerun with" not in forced


def test_force_layout_opt_needs_compile() -> None:
    with pytest.raises(SystemExit):
        report.main(["--force-layout-opt", "--only", "linear"])


def test_gpu_exits_zero_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    import benchmarks.gpu as gpu

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_quick_on_cpu_reports_eager_and_compiled(tmp_path: Path) -> None:
    """``benchmarks.gpu --device cpu --quick``: the GPU benchmark's code end to end on the CPU
    (tiny nets, one round, CPU bf16 autocast): every case and method has an eager and a
    compiled ratio and a compiled / eager ratio."""
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--quick",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "bench-gpu-cpu-quick.json").read_text())
    assert set(data["results"]) == {"resnet50", "convnext_t", "llama_block"}
    for case, r in data["results"].items():
        assert set(r["rows"]) == set(data["meta"]["methods"])
        for m, row in r["rows"].items():
            assert not row["note"], (case, m, row["note"])
            for key in (("eager", "time"), ("compiled", "time"), ("compiled", "vs_eager")):
                v = row[key[0]].get(key[1])
                assert isinstance(v, float) and v > 0, (case, m, key)
        assert r["rows"]["full fine-tuning"]["eager"]["time"] == 1.0
    md = (tmp_path / "bench-gpu-cpu-quick.md").read_text()
    assert "| compiled / eager |" in md and "Llama-like block" in md
