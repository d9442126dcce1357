"""Placeholder demo: prints the version and a Hadamard exp/log round trip.

The LieRA transfer-learning demo replaces this once the PEFT layer lands.
"""

from __future__ import annotations

import torch

import liegroup


def main() -> None:
    print(f"liegroup {liegroup.__version__} (placeholder demo until the PEFT layer lands)")
    G = liegroup.Hadamard((64, 64, 3, 3))
    X = G.random_algebra(dtype=torch.float64) * 0.1
    err = (G.log(G.exp(X)) - X).abs().max().item()
    print(f"Hadamard{G.shape}: max |log(exp(X)) - X| = {err:.2e}")


if __name__ == "__main__":
    main()
