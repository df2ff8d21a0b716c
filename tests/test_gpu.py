"""CUDA checks: truncation kernels, factored layers and compress_ on the GPU (skipped without one)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmd_lightning import EnergyRank, FactoredConv2d, FactoredLinear, compress_
from lmd_lightning.layers.svd import eckart_young_error, truncated_svd
from tests.conftest import matrix_with_spectrum

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_truncation(method: str, dtype: torch.dtype) -> None:
    s = torch.arange(1, 1025, dtype=torch.float64) ** -0.5
    W = matrix_with_spectrum(s, 1024, 1024, torch.float32).cuda()
    f = truncated_svd(W.to(dtype), 64, method=method)
    assert f.U.is_cuda and f.U.dtype == dtype and f.method == method
    # bfloat16 input carries its own rounding: judge the float32 case tightly only.
    tolerance = 1.01 if dtype == torch.float32 else 1.05
    optimum = eckart_young_error(s, 64)
    assert f.error <= optimum * tolerance
    # Measured, not self-reported: the factors' product really is that close to W.
    W_r = (f.U.double() * f.s.double()) @ f.V.double().mT
    measured = float(torch.linalg.matrix_norm(W.double() - W_r))
    assert measured <= optimum * (tolerance if dtype == torch.float32 else 1.10)
    assert measured == pytest.approx(f.error, rel=0.02 if dtype == torch.float32 else 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factored_layers_on_cuda(dtype: torch.dtype) -> None:
    linear = nn.Linear(256, 128, device="cuda", dtype=dtype)
    layer = FactoredLinear.from_linear(linear, 128)
    x = torch.randn(8, 256, device="cuda", dtype=dtype)
    assert layer.U.is_cuda and layer.U.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        assert float((layer(x) - linear(x)).float().norm() / linear(x).float().norm()) < tolerance
    conv = nn.Conv2d(8, 16, 3, padding=1, device="cuda", dtype=dtype)
    fconv = FactoredConv2d.from_conv2d(conv, 16)
    xi = torch.randn(2, 8, 9, 9, device="cuda", dtype=dtype)
    with torch.no_grad():
        assert float((fconv(xi) - conv(xi)).float().norm() / conv(xi).float().norm()) < tolerance
    fconv(xi).float().square().sum().backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in fconv.parameters())


def test_compress_and_bf16_autocast_training_step_on_cuda() -> None:
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).cuda()
    report = compress_(model, EnergyRank(0.5))
    assert report.compressed and all(p.is_cuda for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 64, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())


def _first_norm_seen(fused: bool) -> float:
    import pytorch_lightning as pl

    from lmd_lightning import ConvergenceMonitor, FixedRank, LMDCompression
    from tests.lightning_models import LitMLP, loaders, trainer

    class Fused(LitMLP):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=fused)

    pl.seed_everything(0, verbose=False)
    monitor = ConvergenceMonitor(window=1, min_steps=10**9)
    lmd = LMDCompression(FixedRank(8), trigger=monitor, min_epochs=5)
    train, val = loaders()
    t = trainer(1, [lmd], accelerator="gpu", precision="16-mixed", max_steps=1, deterministic=False)
    t.fit(Fused(), train, val)
    return monitor.ema  # window=1 and one step: the EMA is that step's norm


def test_amp_norm_is_unscaled_for_fused_and_plain_optimizers() -> None:
    # Lightning unscales before on_before_optimizer_step, except for optimizers that unscale inside
    # step() (fused AdamW): there the callback divides by the GradScaler's scale itself.
    plain, fused = _first_norm_seen(False), _first_norm_seen(True)
    assert 0.01 < plain < 100  # unscaled: the scale starts at 65536
    assert fused == pytest.approx(plain, rel=1e-3)


def test_monitor_resumed_on_the_host_continues_on_cuda() -> None:
    from lmd_lightning import ConvergenceMonitor

    def feed(monitor, steps, device):
        for s in steps:
            monitor.update(torch.tensor(5.0 * 0.99**s, device=device), s)

    reference = ConvergenceMonitor(window=10, min_steps=10**9)
    feed(reference, range(57), "cuda")
    first = ConvergenceMonitor(window=10, min_steps=10**9)
    feed(first, range(25), "cuda")  # 5 norms pending in the buffer
    resumed = ConvergenceMonitor(window=10, min_steps=10**9)
    resumed.load_state_dict(first.state_dict())  # rebuilt on the host
    feed(resumed, range(25, 57), "cuda")
    assert resumed.ema == pytest.approx(reference.ema, rel=1e-6)


def test_parameters_without_gradients_on_cuda() -> None:
    from lmd_lightning.monitors.convergence import GradNormMeter

    used, unused = nn.Linear(4, 4).cuda(), nn.Linear(4, 4).cuda()
    used(torch.randn(2, 4, device="cuda")).sum().backward()
    meter = GradNormMeter(per_layer=True)
    meter.refresh(
        [
            *(("used." + n, p) for n, p in used.named_parameters()),
            *(("unused." + n, p) for n, p in unused.named_parameters()),
        ]
    )
    norm, layers = meter.measure()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in used.parameters()]))
    assert float(norm) == pytest.approx(float(expected), rel=1e-5) and float(layers["unused"]) == 0.0
