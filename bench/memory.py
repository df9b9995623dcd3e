"""Peak memory of a block of code above what was resident before it. CPU: the kernel's high-water mark of the
resident set (`VmHWM`), reset through `/proc/self/clear_refs`, in a process started with `CHILD_ENV`; where the
reset is not possible, `ru_maxrss`, and the method says so. CUDA: torch's peak allocation."""
from __future__ import annotations

import contextlib
import gc
import resource
from pathlib import Path

import torch

# glibc: every allocation of 128 KiB or more gets its own mapping, returned to the system when freed, so the
# resident set follows the live tensors instead of what malloc keeps cached
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def rss_kb(field: str) -> int | None:
    "A field of /proc/self/status in KiB (`VmRSS`, `VmHWM`); None where there is none."
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def malloc_trim():
    "Hand memory that glibc keeps after free() back to the system (no-op elsewhere)."
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    "`with PeakMemory(device) as m: ...`, then `m.figures()`: baseline, peak and growth in MB, and the method."

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        gc.collect()
        malloc_trim()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.method = "torch.cuda.max_memory_allocated minus memory_allocated before the model"
            return self
        self.base = (rss_kb("VmRSS") or 0) * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")   # reset the peak RSS (VmHWM) to the current RSS
            self.reset = rss_kb("VmHWM") is not None
        except OSError:
            self.reset = False
        self.method = ("peak RSS (VmHWM, reset via clear_refs) minus RSS before the model, fresh process per variant, "
                       "allocations >= 128 KiB mmapped" if self.reset else
                       "ru_maxrss (the high-water mark could not be reset) minus RSS before the model")
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            hwm = rss_kb("VmHWM") if self.reset else None
            self.peak = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def figures(self) -> dict:
        return {"baseline_mb": self.base / 2**20, "peak_mb": self.peak / 2**20, "growth_mb": (self.peak - self.base) / 2**20,
                "method": self.method}
