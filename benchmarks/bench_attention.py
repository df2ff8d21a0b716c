"""FactoredMultiheadAttention against nn.MultiheadAttention: forward+backward and inference time.

Run from the repository root:

    python -m benchmarks.bench_attention            # d = 256, 512, 768, 1024; results/attention_speed.md
    python -m benchmarks.bench_attention --quick    # d = 256 only, fewer repeats; attention_speed_quick.md
    python -m benchmarks.bench_attention --device cuda

Self-attention on a batch of 8 sequences of 128 tokens, 8 heads (d/64 for d ≥ 512 would change
the head size with d; 8 heads throughout keeps the comparison about the projections), float32,
batch_first. Contenders, in one run, from the same weights:
- `nn.MultiheadAttention` (its packed in_proj; in inference, eval mode without grad, it takes
  torch's fused fast path);
- `FactoredMultiheadAttention` with its four projections dense (the cost of the split alone);
- the same with all four projections factored at rank d/4 and at rank d/8 (`FixedRank`).
Times are medians over repeats (benchmarks.common.time_it); "train" is forward + backward of the
summed output, "inference" a forward in eval mode under `torch.inference_mode()`.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.common import command, device_args, markdown_table, time_it, write_result
from lmd_lightning import FixedRank, compress_
from lmd_lightning.layers import FactoredMultiheadAttention

BATCH, SEQ, HEADS = 8, 128, 8


def contenders(d: int, device: str) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(d, HEADS, batch_first=True, device=device)
    split = FactoredMultiheadAttention.from_mha(mha)
    out = {"nn.MultiheadAttention": mha, "split, dense projections": split}
    for divisor in (4, 8):
        factored = FactoredMultiheadAttention.from_mha(mha)
        holder = nn.Sequential(factored)
        compress_(holder, FixedRank(d // divisor))
        out[f"factored, rank d/{divisor} = {d // divisor}"] = holder[0]
    return out


def measure(module: nn.Module, x: torch.Tensor, device: str, repeats: int) -> tuple[float, float]:
    def train() -> None:
        module.zero_grad(set_to_none=True)
        module(x, x, x, need_weights=False)[0].sum().backward()

    def infer() -> None:
        with torch.inference_mode():
            module(x, x, x, need_weights=False)

    module.train()
    t_train = time_it(train, repeats=repeats, device=device)
    module.eval()
    t_infer = time_it(infer, repeats=repeats, device=device)
    return t_train, t_infer


def main(argv: list[str] | None = None) -> list[list[str]]:
    args = device_args(__doc__.splitlines()[0], "d = 256 only, 3 repeats (CI smoke test)", argv)
    widths, repeats = ([256], 3) if args.quick else ([256, 512, 768, 1024], 7)
    rows = []
    for d in widths:
        x = torch.randn(BATCH, SEQ, d, device=args.device)
        base_train = base_infer = None
        for name, module in contenders(d, args.device).items():
            params = sum(p.numel() for p in module.parameters())
            t_train, t_infer = measure(module, x, args.device, repeats)
            base_train, base_infer = base_train or t_train, base_infer or t_infer
            rows.append(
                [
                    str(d),
                    name,
                    f"{params:,}",
                    f"{1e3 * t_train:.2f}",
                    f"{base_train / t_train:.2f}×",
                    f"{1e3 * t_infer:.2f}",
                    f"{base_infer / t_infer:.2f}×",
                ]
            )
            print(rows[-1], flush=True)
    header = ["d", "contender", "params", "train ms", "train speed-up", "inference ms", "inference speed-up"]
    body = (
        f"Self-attention, batch {BATCH} × {SEQ} tokens, {HEADS} heads, float32. Speed-ups are against "
        "nn.MultiheadAttention at the same d (> 1 is faster).\n\n" + markdown_table(header, rows, "rlrrrrr")
    )
    suffix = "_quick" if args.quick else ("_cuda" if args.device == "cuda" else "")
    title = "Factored attention vs nn.MultiheadAttention"
    path = write_result(f"attention_speed{suffix}", title, body, command("bench_attention", argv), args.device)
    print(path.read_text())
    return rows


if __name__ == "__main__":
    main()
