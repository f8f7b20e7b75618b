"""Timing and peak-memory measurement for the benchmarks, and a description of the machine.

Time: wall-clock seconds and the process's CPU seconds (all threads). On a shared machine the CPU
time is the steadier measure of work done, so the benchmarks take their ratios from it on CPU
(both sides run with the same thread count); on CUDA the wall time (after synchronizing) is used.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the measured block; on CPU, the
process's peak resident set size over the block (Linux: the kernel's high-water mark ``VmHWM``,
reset at the start of the block through ``/proc/self/clear_refs``; elsewhere sampled every few
milliseconds by a background thread, since torch's CPU allocator keeps no peak statistics). Both
are reported as the peak during the block and the increase over the value when the block started.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import platform
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import psutil
import torch

MiB = 2**20


@dataclass
class Measurement:
    """Wall and process CPU time (s) of a block, its peak memory and the increase over its start (bytes)."""

    seconds: float = 0.0
    cpu: float = 0.0
    peak: int = 0
    extra: int = 0

    def cost(self, device: torch.device) -> float:
        """What ratios are taken from (see :func:`cost`)."""
        return cost(device, self.seconds, self.cpu)


def cost(device: torch.device, wall: float, cpu: float) -> float:
    """CPU seconds on CPU, wall seconds on CUDA (where the host mostly waits for the GPU)."""
    return wall if device.type == "cuda" else cpu


def _hwm_reset() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _hwm() > 0
    except OSError:
        return False


def _hwm() -> int:
    """The process's peak resident set size since the last reset (bytes), from ``/proc/self/status``."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _trim() -> None:
    """Give freed heap memory back to the OS so the next block's RSS baseline is honest (glibc only)."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextmanager
def measured(device: torch.device, interval: float = 0.003) -> Iterator[Measurement]:
    """Time the block and record its peak memory on ``device``.

    >>> with measured(torch.device("cpu")) as m:
    ...     _ = torch.ones(1000)
    >>> m.seconds > 0 and m.peak > 0
    True
    """
    result = Measurement()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            yield result
        finally:
            torch.cuda.synchronize(device)
            result.seconds = time.perf_counter() - start
            result.cpu = time.process_time() - start_cpu
            result.peak = torch.cuda.max_memory_allocated(device)
            result.extra = result.peak - start_bytes
        return
    _trim()
    process = psutil.Process()
    start_bytes = process.memory_info().rss
    peak = [start_bytes]
    stop = threading.Event()
    kernel_peak = _hwm_reset()

    def sample() -> None:
        while not stop.wait(interval):
            peak[0] = max(peak[0], process.memory_info().rss)

    thread = None if kernel_peak else threading.Thread(target=sample, daemon=True)
    if thread is not None:
        thread.start()
    start, start_cpu = time.perf_counter(), time.process_time()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - start
        result.cpu = time.process_time() - start_cpu
        if thread is not None:
            stop.set()
            thread.join()
        peak[0] = max(peak[0], process.memory_info().rss, _hwm() if kernel_peak else 0)
        result.peak, result.extra = peak[0], peak[0] - start_bytes


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux, else the platform string)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, str]:
    """Date, machine, versions and load: what a results table needs next to its numbers."""
    import transformers

    info = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": f"{cpu_name()} ({os.cpu_count()} logical cores)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
        "load average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
