from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmd_lightning.layers import svd
from lmd_lightning.layers.svd import SVDFailedError, eckart_young_error, energy_kept, truncated_svd
from tests.conftest import matrix_with_spectrum


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 40), n=st.integers(2, 40), data=st.data())
def test_eckart_young_error_and_optimality(m: int, n: int, data) -> None:
    rank = data.draw(st.integers(1, min(m, n)))
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    f = truncated_svd(W, rank, method="exact")
    s = torch.linalg.svdvals(W)
    measured = float(torch.linalg.matrix_norm(W - (f.U * f.s) @ f.V.T))
    assert f.error == pytest.approx(math.sqrt(float(s[rank:].square().sum())), abs=1e-9)
    assert measured == pytest.approx(f.error, abs=1e-9)
    # No random rank-r matrix does better (Eckart–Young–Mirsky).
    for _ in range(5):
        A = torch.randn(m, rank, generator=gen, dtype=torch.float64)
        B = torch.randn(rank, n, generator=gen, dtype=torch.float64)
        # Best scale of A·B is a least-squares fit, which only helps the challenger.
        AB = A @ B
        alpha = float((W * AB).sum() / AB.square().sum())
        assert float(torch.linalg.matrix_norm(W - alpha * AB)) >= f.error - 1e-9


def test_energy_and_error_from_spectrum() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 0.0])
    assert eckart_young_error(s, 1) == pytest.approx(math.sqrt(5.0))
    assert energy_kept(s, 2) == pytest.approx(20.0 / 21.0)
    f = truncated_svd(matrix_with_spectrum(s[:3], 6, 5), 2, method="exact")
    assert f.relative_error == pytest.approx(1.0 / math.sqrt(21.0), rel=1e-9)
    assert f.energy == pytest.approx(20.0 / 21.0, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_factors_are_cast_back_to_the_weight_dtype(dtype: torch.dtype) -> None:
    W = torch.randn(20, 12).to(dtype)
    f = truncated_svd(W, 5)
    assert f.U.dtype == f.s.dtype == f.V.dtype == dtype
    assert f.U.shape == (20, 5) and f.V.shape == (12, 5) and f.s.shape == (5,)


def test_auto_picks_randomized_only_for_small_ranks_of_big_matrices() -> None:
    assert svd.use_randomized((1024, 1024), 64)
    assert not svd.use_randomized((1024, 1024), 512)
    assert not svd.use_randomized((128, 128), 4)


def test_randomized_matches_optimum_on_decaying_spectrum() -> None:
    s = torch.arange(1, 601, dtype=torch.float64) ** -1.0
    W = matrix_with_spectrum(s, 600, 600, torch.float32)
    f = truncated_svd(W, 32, method="randomized")
    assert f.method == "randomized"
    optimum = eckart_young_error(s, 32)
    measured = float(torch.linalg.matrix_norm(W - (f.U * f.s) @ f.V.T))
    assert measured == pytest.approx(f.error, rel=1e-3)
    assert f.error <= optimum * 1.01
    # Orthonormal factors, as the exact path gives.
    torch.testing.assert_close(f.U.T @ f.U, torch.eye(32), atol=1e-4, rtol=0)


def test_randomized_falls_back_to_exact_when_not_converged(monkeypatch) -> None:
    s = torch.linspace(1.0, 0.9, 600, dtype=torch.float64)  # flat: the sketch converges slowly
    W = matrix_with_spectrum(s, 600, 600, torch.float32)
    monkeypatch.setattr(svd, "MAX_POWER_ITERS", 1)  # fewer than MIN_POWER_ITERS: never converges
    f = truncated_svd(W, 32, method="auto")
    assert f.method == "exact"
    assert f.error == pytest.approx(eckart_young_error(torch.linalg.svdvals(W.double()), 32), rel=1e-4)


@pytest.mark.parametrize(("gap", "kept"), [(0.005, "randomized"), (0.02, "exact")])
def test_randomized_result_over_1pc_above_the_optimum_falls_back_to_exact(monkeypatch, gap: float, kept: str) -> None:
    """The real rule: with the exact spectrum known, a randomized error more than 1% above Eckart–Young is refused."""
    W = matrix_with_spectrum(torch.linspace(1.0, 0.5, 600, dtype=torch.float64), 600, 600, torch.float32)
    spectrum = torch.linalg.svdvals(W)
    optimum = eckart_young_error(spectrum, 32)

    def off_by_gap(work: torch.Tensor, rank: int) -> svd.Factors:
        exact = svd._exact(work, rank)
        return svd.Factors(exact.U, exact.s, exact.V, optimum * (1 + gap), exact.norm, "randomized")

    monkeypatch.setattr(svd, "_randomized", off_by_gap)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        factors = truncated_svd(W, 32, method="randomized", spectrum=spectrum)
    assert factors.method == kept
    fell_back = [str(w.message) for w in caught if "using exact SVD" in str(w.message)]
    assert fell_back == (
        [] if kept == "randomized" else ["randomized SVD of `weight` is over 1% above the optimum; using exact SVD"]
    )
    if kept == "exact":
        assert factors.error == pytest.approx(optimum, rel=1e-6)


def test_non_finite_weight_names_the_layer() -> None:
    W = torch.randn(5, 5)
    W[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"layer `enc.fc` has 1 non-finite"):
        truncated_svd(W, 2, name="enc.fc")
    with pytest.raises(ValueError, match=r"non-finite"):
        svd.singular_values(torch.full((3, 3), float("inf")), "x")


def test_failed_svd_is_retried_in_float64(monkeypatch) -> None:
    real_svd = torch.linalg.svd
    seen = []

    def flaky(A, *args, **kwargs):
        seen.append(A.dtype)
        if A.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real_svd(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    with pytest.warns(UserWarning, match="retrying in float64"):
        f = truncated_svd(torch.randn(8, 6), 3, method="exact")
    assert seen == [torch.float32, torch.float64] and f.U.dtype == torch.float32


def test_svd_failing_twice_raises(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    with (
        pytest.raises(SVDFailedError, match="float32 and float64"),
        pytest.warns(UserWarning, match="retrying in float64"),
    ):
        truncated_svd(torch.randn(8, 6), 3, method="exact", name="fc")


@pytest.mark.parametrize(("rank", "method"), [(0, "exact"), (7, "exact"), (2, "fast")])
def test_invalid_arguments(rank: int, method: str) -> None:
    with pytest.raises(ValueError, match="`rank`|`method`"):
        truncated_svd(torch.randn(6, 6), rank, method=method)
    with pytest.raises(ValueError, match="2-D"):
        truncated_svd(torch.randn(2, 3, 4), 1)
