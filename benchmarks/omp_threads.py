"""Why `lorakit serve` decodes on the main thread: the same small ops timed on the main thread and on a second.

    python benchmarks/omp_threads.py --threads 2

PyTorch's CPU ops run on GNU OpenMP thread teams, one team per thread that computes. With a second team in the
process, libgomp's workers stop spinning between parallel regions (it throttles spinning once more threads are
managed than there are CPUs), so each op that goes parallel pays a wake-up of its workers. A decode step at batch
16 is hundreds of such ops. Prints microseconds per call, main thread vs a second thread, of a decode-sized LoRA
down-projection (16 × 576 @ 576 × 16), its up-projection (addmm_ into 16 × 1536), and a base projection
(16 × 576 @ 576 × 1536).
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch


def per_call_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def measure(calls: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x, A = torch.randn(16, 576, generator=g), torch.randn(16, 576, generator=g)
    B, y = torch.randn(1536, 16, generator=g), torch.randn(16, 1536, generator=g)
    W = torch.randn(1536, 576, generator=g)
    u = x @ A.t()
    return {
        "x @ A.t() (16x576 @ 576x16)": per_call_us(lambda: x @ A.t(), calls),
        "y.addmm_(u, B.t()) (16x16 @ 16x1536)": per_call_us(lambda: y.addmm_(u, B.t()), calls),
        "x @ W.t() (16x576 @ 576x1536)": per_call_us(lambda: x @ W.t(), calls // 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    main_thread = measure(args.calls)
    other: dict[str, float] = {}
    t = threading.Thread(target=lambda: other.update(measure(args.calls)))
    t.start()
    t.join()
    load = os.getloadavg()[0]
    print(f"{args.threads} threads, {os.cpu_count()} CPUs, load average {load:.1f}; microseconds per call")
    print(f"{'op':40} {'main thread':>12} {'second thread':>14}")
    for k, v in main_thread.items():
        print(f"{k:40} {v:12.1f} {other[k]:14.1f}")


if __name__ == "__main__":
    main()
