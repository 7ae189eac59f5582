"""A description of the machine that a benchmark ran on."""

from __future__ import annotations

import os
import platform

import torch

from course_lib.device import Precision


def describe_machine(
    device: torch.device, precision: Precision
) -> list[tuple[str, str]]:
    """Return (label, text) rows: CPU, cores, torch, threads, device, load."""
    cores = f"{os.cpu_count()} logical cores"
    if hasattr(os, "sched_getaffinity"):
        usable = len(os.sched_getaffinity(0))
        if usable != os.cpu_count():
            cores += f", {usable} usable by this process"
    device_text = f"{device} ({precision.name})"
    if device.type == "cuda":
        device_text += f", {torch.cuda.get_device_name(device)}"
    threads = torch.get_num_threads()
    thread_text = "1 intra-op thread" if threads == 1 else f"{threads} intra-op threads"
    return [
        ("cpu", f"{cpu_model()}, {cores}"),
        ("torch", f"{torch.__version__}, {thread_text}"),
        ("device", device_text),
        ("python", f"{platform.python_version()} on {platform.platform()}"),
        ("load average", f"{load_average()} at the start"),
    ]


def cpu_model() -> str:
    """Return the CPU's model name from /proc/cpuinfo, or what platform reports."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """Return the 1- and 5-minute load averages, the mean number of runnable tasks."""
    if not hasattr(os, "getloadavg"):
        return "not available on this platform"
    load_1, load_5, _ = os.getloadavg()
    return f"{load_1:.2f} (1 min), {load_5:.2f} (5 min)"
