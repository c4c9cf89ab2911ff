"""The machine's matmul peak, measured: best FLOP/s of square torch GEMMs with the benchmark's thread count.

    python bench/matmul_peak.py --threads 2 [--seconds 2]                 # CPU, float32 (the default)
    python bench/matmul_peak.py --device cuda --dtype bf16 [--seconds 2]  # a GPU, bfloat16

An n x n @ n x n matmul is 2 n^3 FLOPs. For each size the GEMM is repeated for about ``--seconds`` (at least 3
times, after one warm-up) and the best rate is kept; the peak is the best over the sizes. On a GPU a measurement is
a burst of 10 GEMMs between two ``torch.cuda.synchronize()`` (kernels run asynchronously). Each stage's achieved
model FLOP/s is reported as a share of this number; on cuda, in bf16, that share is the MFU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit, set_threads  # noqa: E402

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
SIZES = {"cpu": "512,1024,2048", "cuda": "4096,8192,16384"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--sizes", default=None, help="comma-separated n (default: cpu 512,1024,2048; "
                                                  "cuda 4096,8192,16384)")
    args = ap.parse_args()
    set_threads(args.threads)
    import torch

    dtype, dev = getattr(torch, DTYPES[args.dtype]), torch.device(args.device)
    burst = 10 if dev.type == "cuda" else 1

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    per_size = {}
    for n in (int(x) for x in (args.sizes or SIZES[dev.type]).split(",")):
        a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        c = torch.empty(n, n, device=dev, dtype=dtype)
        torch.mm(a, b, out=c)  # warm-up
        sync()
        best, t_end, reps = 0.0, time.perf_counter() + args.seconds, 0
        while reps < 3 or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            for _ in range(burst):
                torch.mm(a, b, out=c)
            sync()
            dt = time.perf_counter() - t0
            best = max(best, burst * 2 * n ** 3 / dt)
            reps += 1
        per_size[n] = best
        del a, b, c
    emit({"side": "machine", "stage": "matmul_peak", "peak_flops": max(per_size.values()),
          "per_size": {str(k): v for k, v in per_size.items()}, "threads": args.threads, "device": dev.type,
          "dtype": DTYPES[args.dtype], **({"gpu": torch.cuda.get_device_name()} if dev.type == "cuda" else {})})
    return 0


if __name__ == "__main__":
    sys.exit(main())
