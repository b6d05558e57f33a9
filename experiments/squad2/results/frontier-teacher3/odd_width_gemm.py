"""Why the patched path misses its prediction on the AMD EPYC: fp32 GEMM time at odd widths (B32xL192 = 6,144 rows,
1 thread, torch.addmm, median of 7 after 2 warm-ups). Run from the repository root:
python experiments/squad2/results/frontier-teacher3/odd_width_gemm.py"""
import statistics
import time

import torch


def addmm_ms(k: int, n: int, m: int = 6144) -> float:
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    for _ in range(2):
        torch.addmm(b, x, w.t())
    samples = []
    for _ in range(7):
        t0 = time.perf_counter()
        torch.addmm(b, x, w.t())
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


if __name__ == "__main__":
    torch.set_num_threads(1)
    for k in (347, 352, 356, 384):
        print(f"hidden {k}: [{k} -> 792] {addmm_ms(k, 792):.2f} ms, [792 -> {k}] {addmm_ms(792, k):.2f} ms, "
              f"[{k} -> {k}] {addmm_ms(k, k):.2f} ms")
