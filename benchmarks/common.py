"""Shared benchmark plumbing: the machine header every result file starts with, timing, markdown tables."""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"

# Column alignment codes for `markdown_table`: left, right, centre.
ALIGN_MARKERS = {"l": "---", "r": "---:", "c": ":---:"}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_header(device: torch.device | str = "cpu") -> str:
    """Markdown lines naming the machine, torch version, thread count and device."""
    device = torch.device(device)
    lines = [
        f"- machine: {platform.node()} ({platform.system()} {platform.machine()}), CPU: {cpu_model()}",
        f"- python {platform.python_version()}, torch {torch.__version__}, threads: {torch.get_num_threads()}",
    ]
    if device.type == "cuda":
        lines.append(f"- device: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})")
    else:
        lines.append("- device: cpu")
    return "\n".join(lines)


def rss(key: str = "VmRSS") -> int:
    """A /proc/self/status field in bytes: VmRSS (resident now) or VmHWM (peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def tensor_bytes(tensors) -> int:
    """Bytes held by the tensors among `tensors` (other items, such as None gradients, are skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def time_it(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 2, device: str = "cpu") -> float:
    """Median wall time of `fn()` in seconds over `repeats` runs after `warmup` runs."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def markdown_row(cells: Sequence[str]) -> str:
    """One markdown table row: `| a | b | c |`."""
    return "| " + " | ".join(cells) + " |"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str | Sequence[str]) -> str:
    """A markdown table: the header row, the `|---|---:|` separator, then the rows (no trailing newline).

    `align` gives one code per column, `l` (left), `r` (right) or `c` (centre): `"lrr"` or `["l", "r", "r"]`.
    """
    if len(align) != len(header):
        raise ValueError(f"{len(align)} alignment codes for {len(header)} columns")
    separator = "|" + "|".join(ALIGN_MARKERS[code] for code in align) + "|"
    lines = [markdown_row(header), separator]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row with {len(row)} cells in a table of {len(header)} columns: {row}")
        lines.append(markdown_row(row))
    return "\n".join(lines)


def command(module: str, argv: list[str] | None) -> str:
    """How to reproduce a run: `python -m benchmarks.<module>` and its arguments (sys.argv's when `argv` is None)."""
    given = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m benchmarks." + module, *given])


def write_result(name: str, title: str, body: str, command: str, device: str = "cpu") -> Path:
    """Write benchmarks/results/<name>.md with the machine header and how to reproduce it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    text = f"# {title}\n\n{machine_header(device)}\n- reproduce: `{command}`\n\n{body.rstrip()}\n"
    path.write_text(text)
    return path


def device_args(description: str, quick_help: str, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse --quick, --device cpu|cuda and --threads; apply the thread count; refuse a missing GPU."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own; printed in the header)"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args
