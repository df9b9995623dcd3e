"""Timing that can be trusted on a shared machine: each call clocked (CUDA synchronized), variants interleaved
within a repeat so drift hits all alike, medians with their scatter, and a record of the machine and of the CPU
time other processes took meanwhile (`OtherLoad`: above 0.05 cores the figures are distorted)."""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def machine_info(device: str) -> dict:
    "What the figures were measured on."
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import transformers
    info = {"device": device, "cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


class OtherLoad:
    """CPU time other processes used while the benchmark ran, in cores (0 = the machine was ours alone).
    Timings taken while other work competes for the cores are not worth reporting: the table flags them."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f[:8])
            return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        return None

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def cores(self) -> float | None:
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        return max(0.0, (busy - self.busy0) - (self._own() - self.own0)) / (time.perf_counter() - self.t0)


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def clock(fn, device: str) -> float:
    "Seconds `fn()` takes (CUDA work included)."
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def spread(times: list[float]) -> float | None:
    "Interquartile range over the median: how much one repeat scatters (the median's error is smaller)."
    if len(times) < 4:
        return None
    q1, _, q3 = statistics.quantiles(times, n=4)
    return (q3 - q1) / statistics.median(times)


def interleaved(fns: dict, repeats: int, warmup: int, device: str, raw: dict | None = None) -> dict[str, float]:
    "Median seconds per call of every function in `fns`, called in turn, `warmup` rounds discarded (all times into `raw`)."
    times = {k: [] for k in fns} if raw is None else raw
    times.update({k: [] for k in fns})
    names = list(fns)
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate the order: no variant always goes first
        for k in order:
            t = clock(lambda: fns[k](r), device)
            if r >= warmup:
                times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}
