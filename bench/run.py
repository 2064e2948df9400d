"""Runs the benchmarks and writes bench/report.md.

    python -m bench.run --size small   # every benchmark at a small size (CI)
    python -m bench.run --size full    # the sizes PRODUCT.md section 10 names
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.common import Figure

BENCHMARKS = [
    "bench.bench_pull",
    "bench.bench_ingest",
    "bench.bench_identity",
    "bench.bench_rebuild_core",
    "bench.bench_profiles",
    "bench.bench_validation",
    "bench.bench_microbatch",
]
REPORT = Path(__file__).resolve().parent / "report.md"


def render(figures: list[Figure], size: str, failures: list[str]) -> str:
    lines = [
        "# Benchmark report",
        "",
        f"Size `{size}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}, "
        f"{platform.machine()}; targets from PRODUCT.md section 10. Ratio > 1 meets the target.",
        "",
        "| benchmark | figure | value | target | ratio | notes |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        ratio = f"{f.ratio:.2f}×" if f.ratio is not None else "—"
        lines.append(f"| {f.benchmark} | {f.name} | {f.value:g} {f.unit} | {f.target_text} | {ratio} | {f.note} |")
    for failure in failures:
        lines.append(f"| {failure} | FAILED | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=["small", "full"], default="small")
    parser.add_argument("--only", help="run just this module, e.g. bench_pull")
    parser.add_argument("--report", default=str(REPORT))
    args = parser.parse_args(argv)
    figures: list[Figure] = []
    failures: list[str] = []
    for name in BENCHMARKS:
        if args.only and not name.endswith(args.only):
            continue
        started = time.perf_counter()
        try:
            results = importlib.import_module(name).run(args.size)
        except Exception as exc:  # a broken benchmark must fail the run, with its name
            print(f"{name}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            failures.append(name)
            continue
        for f in results:
            ratio = f"{f.ratio:.2f}x target" if f.ratio is not None else "no target"
            print(f"{f.benchmark}: {f.name}: {f.value:g} {f.unit} ({ratio}) {f.note}", flush=True)
        figures.extend(results)
        print(f"{name}: {time.perf_counter() - started:.1f} s", flush=True)
    Path(args.report).write_text(render(figures, args.size, failures))
    print(f"wrote {args.report}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
