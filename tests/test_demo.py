"""The transfer demo (examples/demo.py): its input shift, its choice of rates, a smoke run."""

from __future__ import annotations

import pytest
import torch

from examples import demo


def test_thicken_is_a_cross_dilation():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 4] = 1.0
    y = demo.thicken(x)
    assert y.shape == x.shape
    assert torch.nonzero(y[0, 0]).tolist() == [[2, 4], [3, 3], [3, 4], [3, 5], [4, 4]]
    corner = torch.zeros(1, 1, 8, 8)
    corner[0, 0, 0, 0] = 0.5  # the border is padded with zeros, not wrapped
    assert torch.nonzero(demo.thicken(corner)[0, 0]).tolist() == [[0, 0], [0, 1], [1, 0]]
    digits = torch.rand(5, 1, 8, 8)
    assert (demo.thicken(digits) >= digits).all()


def test_tasks_share_labels_and_split_only_the_inputs_differ():
    _, _, tr, va, te = demo.load_data()
    assert len(tr.y) == 5 * demo.SHOTS and len(va.y) == 5 * demo.N_VAL
    assert set(tr.y.tolist()) == set(te.y.tolist()) == set(range(5))
    shifted = tr.map(demo.TASKS["digits 5-9, thick strokes"])
    assert torch.equal(shifted.y, tr.y) and not torch.equal(shifted.x, tr.x)
    assert torch.equal(tr.map(demo.TASKS["digits 5-9"]).x, tr.x)


def test_rate_is_chosen_on_validation_and_compared_with_lora():
    lrs = (1e-2, 3e-2, 1e-1)
    # (val, test, seconds) per seed: LoRA best at 1e-2, LieRA exact best at 1e-1 on validation,
    # though test would prefer 3e-2 (the test split must not choose)
    res = {
        (demo.LORA, 4): {1e-2: [(0.9, 0.8, 1.0)] * 2, 3e-2: [(0.8, 0.9, 1.0)] * 2,
                         1e-1: [(0.7, 0.7, 1.0)] * 2},
        (demo.EXACT, 4): {1e-2: [(0.6, 0.6, 1.0)] * 2, 3e-2: [(0.7, 0.99, 1.0)] * 2,
                          1e-1: [(0.95, 0.85, 1.0), (0.95, 0.87, 1.0)]},
    }
    rows = demo.summarise(res, {k: 10 for k in res}, lrs)
    lora, exact = rows
    assert (lora.lr, exact.lr) == (1e-2, 1e-1)
    assert exact.tests == [0.85, 0.87]
    text = demo.table(rows, lrs)
    assert "| LieRA exact | 4 | 10 | 0.1 (grid edge) | 10× |" in text
    assert "+0.060 ± 0.014" in text  # paired: (0.85 - 0.8, 0.87 - 0.8)
    assert "**0.950**" in demo.lr_table(rows, lrs)


def test_quick_run_prints_both_tasks(capsys):
    out = demo.main(["--quick", "--workers", "1", "--no-plot", "--lrs", "3e-2"])
    assert set(out) == set(demo.TASKS)
    for rows in out.values():
        assert [r.method for r in rows] == [demo.LORA, demo.FIRST, demo.EXACT]
        assert all(len(r.tests) == 2 and min(r.tests) >= 0.0 for r in rows)
    printed = capsys.readouterr().out
    assert "### digits 5-9\n" in printed and "### digits 5-9, thick strokes\n" in printed


@pytest.mark.slow
def test_quick_run_in_worker_processes():
    out = demo.main(["--quick", "--workers", "2", "--no-plot"])
    assert set(out) == set(demo.TASKS)
