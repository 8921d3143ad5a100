"""Release the OpenMP thread pool of a thread that is done with parallel work.

GNU OpenMP (libgomp, which the PyPI torch wheels bundle and which MKL and oneDNN run on there)
keeps one pool of worker threads per thread that ever ran a parallel region. The serving
engine loads its model on one thread and decodes on another (transformers' generation thread),
so after loading the process holds two pools: more OpenMP threads than cores. libgomp then
throttles the spinning with which its workers wait for the next region (GOMP_SPINCOUNT's
throttled count) and they fall asleep between the hundreds of small matrix products of a
decode step, so every product pays a futex wake-up. Measured on 2 cores (SmolLM2-135M's
211 linears, one row, oneDNN prepacked weights): 31-34 ms per pass on the loading thread,
44-55 ms on a second thread, and 36 ms on the second thread once the first released its pool
(BENCHMARKS.md, "A decode step's matrix products").

`omp_pause_resource_all(omp_pause_hard)` (OpenMP 5.0) is how a thread gives its pool back:
libgomp frees only the calling thread's pool, and refuses (returns -1) inside a parallel
region, so calling it while another thread computes is safe. LLVM's and Intel's runtimes
(libomp, libiomp5: macOS, IPEX) keep one pool for the whole process, and their hard pause shuts
the whole runtime down, so this does nothing there.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

OMP_PAUSE_HARD = 2  # omp_pause_resource_t: omp_pause_soft = 1, omp_pause_hard = 2
_found: ctypes._CFuncPtr | None = None


def release_thread_pool() -> bool:
    """Free this thread's OpenMP worker threads (a later parallel region on this thread makes
    new ones). True when a libgomp pool was released or there was none to release."""
    pause = _libgomp_pause()
    return pause is not None and pause(OMP_PAUSE_HARD) == 0


def _libgomp_pause() -> ctypes._CFuncPtr | None:
    """libgomp's omp_pause_resource_all where this process has libgomp loaded, else None (it
    is looked up again next time: torch may not be imported yet)."""
    global _found
    if _found is not None:
        return _found
    for path in _loaded_libraries():
        if Path(path).name.startswith("libgomp"):
            try:
                pause = ctypes.CDLL(path).omp_pause_resource_all
            except (OSError, AttributeError):  # a libgomp older than GCC 9
                return None
            pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
            _found = pause
            return pause
    return None


def _loaded_libraries() -> list[str]:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: no libgomp from a torch wheel either
        return []
    return sorted({line.split()[-1] for line in maps.splitlines() if ".so" in line})
