"""A decode step's matrix products on this CPU: F.linear against prepacked oneDNN weights.

A decode step multiplies a few rows (one per running request) by every weight matrix of the
model, so on a CPU it is bound by how fast the weights stream from memory. This times the
linear layers of a model shaped like SmolLM2-135M (30 layers: q 576x576, k and v 192x576, o
576x576, gate and up 1536x576, down 576x1536, then the 49152x576 lm head; random weights) at
1 and 16 rows, on the main thread, on a second thread (the engine's generation thread is one)
while the main thread keeps its OpenMP pool, and on a second thread after the main thread
released it (llmray/omp_pools.py: with two pools on two cores libgomp throttles its workers'
spinning), three ways:

- `F.linear`, what the model runs today (MKL's sgemm, oneDNN for bf16);
- oneDNN's matmul on a weight reordered once into its blocked layout (what torch.compile's
  freezing does to inference linears: `torch.ops.mkldnn._reorder_linear_weight` +
  `_linear_pointwise`);
- numpy's matmul (OpenBLAS) on the transposed weight, as a second BLAS for reference.

    python benchmarks/linear_kernels.py --dtype float32
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmray import omp_pools

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LAYERS = 30
LM_HEAD = (49152, 576)
PASSES = 8


def per_pass(fn) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(PASSES):
        fn()
    return (time.perf_counter() - start) / PASSES


def kernels(torch, weights: list, rows: int) -> dict:
    """name -> a function running every matrix product of one pass at `rows` rows."""
    dtype = weights[0].dtype
    xs = {k: torch.randn(rows, k).to(dtype) for k in (576, 1536)}
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights]
    found = {
        "F.linear": lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in weights],
        "oneDNN prepacked": lambda: [
            torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")
            for w, p in zip(weights, packed, strict=True)
        ],
    }
    if dtype == torch.float32:
        transposed = [w.t().contiguous().numpy() for w in weights]
        arrays = {k: v.numpy() for k, v in xs.items()}
        found["numpy (OpenBLAS)"] = lambda: [arrays[w.shape[0]] @ w for w in transposed]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", default="1,16")
    args = parser.parse_args()
    import torch

    dtype = getattr(torch, args.dtype)
    weights = [torch.randn(o, i).to(dtype) for o, i in SHAPES * LAYERS + [LM_HEAD]]
    mega = sum(w.numel() * w.element_size() for w in weights) / 1e6
    print(
        f"{args.dtype}, {len(weights)} matrices, {mega:.0f} MB, {torch.get_num_threads()} threads"
    )
    print("| rows | thread | kernel | ms per pass | GB/s |")
    print("|---:|---|---|---:|---:|")
    for rows in [int(r) for r in args.rows.split(",")]:
        for where in ("main", "second", "second, main's pool released"):
            for name, fn in kernels(torch, weights, rows).items():
                result: list[float] = []
                worker = threading.Thread(target=lambda f=fn, r=result: r.append(per_pass(f)))
                if where == "main":
                    result.append(per_pass(fn))
                else:
                    per_pass(fn)  # the main thread's pool exists (kernels() made one too)
                    if where != "second":
                        omp_pools.release_thread_pool()
                    worker.start()
                    worker.join()
                rate = mega / 1e3 / result[0]
                print(f"| {rows} | {where} | {name} | {result[0] * 1e3:.1f} | {rate:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
