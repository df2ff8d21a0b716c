"""Shared fixtures: seeded randomness and matrices with known spectra.

The rule for every test here: it must fail if the feature its name describes is removed or broken.
Check values that would be wrong without the feature (an output recomputed by hand, an exact count,
a message), not only that nothing raised; a range check such as `0 <= acc <= 1` is not an
assertion of behaviour. Where a check could pass by accident, add the case that shows it can
fail (see test_calibration_leaves_a_shuffled_loaders_order_alone, or the blocker check in
test_architecture.py).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def matrix_with_spectrum(s: torch.Tensor, out_dim: int, fan_in: int, dtype=torch.float64) -> torch.Tensor:
    """Q1·diag(s)·Q2ᵀ (out_dim, fan_in) with random orthonormal Q1, Q2."""
    k = s.numel()
    q1 = torch.linalg.qr(torch.randn(out_dim, k, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(fan_in, k, dtype=torch.float64)).Q
    return ((q1 * s.double()) @ q2.T).to(dtype)
