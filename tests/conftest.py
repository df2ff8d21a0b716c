"""Shared fixtures: seeded randomness and matrices with known spectra."""

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
