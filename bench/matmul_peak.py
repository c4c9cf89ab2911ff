"""The machine's fp32 matmul peak, measured: best FLOP/s of square torch GEMMs with the benchmark's thread count.

    python bench/matmul_peak.py --threads 2 [--seconds 2]

An n x n @ n x n matmul is 2 n^3 FLOPs. For each size the GEMM is repeated for about ``--seconds`` (at least 3
times, after one warm-up) and the best single-call rate is kept; the peak is the best over the sizes. Each stage's
achieved model FLOP/s is reported as a share of this number.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit, set_threads  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--sizes", default="512,1024,2048")
    args = ap.parse_args()
    set_threads(args.threads)
    import torch

    per_size = {}
    for n in (int(x) for x in args.sizes.split(",")):
        a, b = torch.randn(n, n), torch.randn(n, n)
        c = torch.empty(n, n)
        torch.mm(a, b, out=c)  # warm-up
        best, t_end, reps = 0.0, time.perf_counter() + args.seconds, 0
        while reps < 3 or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            dt = time.perf_counter() - t0
            best = max(best, 2 * n ** 3 / dt)
            reps += 1
        per_size[n] = best
    emit({"side": "machine", "stage": "matmul_peak", "peak_flops": max(per_size.values()),
          "per_size": {str(k): v for k, v in per_size.items()}, "threads": args.threads})
    return 0


if __name__ == "__main__":
    sys.exit(main())
