"""Process-parallel map for the data commands (synth, prepare), with a one-line progress count."""
from __future__ import annotations

import os
import time
from typing import Callable, Iterable


def _worker_init():
    import cv2
    import torch
    torch.set_num_threads(1)  # one process per core; threads inside would oversubscribe
    cv2.setNumThreads(1)


def parallel_map(fn: Callable, tasks: list, jobs: int | None = None, progress: bool = False,
                 what: str = "clips") -> list:
    """[fn(t) for t in tasks] in order, over `jobs` processes (default: all cores)."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    results, t0 = [], time.perf_counter()
    pool = None
    it: Iterable = map(fn, tasks)
    if jobs > 1:
        import multiprocessing as mp
        # spawned, not forked: a fork taken after torch started its thread pool can deadlock the child
        pool = mp.get_context("spawn").Pool(jobs, initializer=_worker_init)
        it = pool.imap(fn, tasks)
    try:
        for r in it:
            results.append(r)
            if progress:
                print(f"\r{len(results)}/{len(tasks)} {what} ({time.perf_counter() - t0:.0f} s)", end="", flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if progress:
        print()
    return results
