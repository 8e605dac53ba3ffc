"""The machine a measurement ran on, in words: a timing kept in a record means little without it (a shapes
cell trained about twice as long on an AVX2 CPU as on an AVX-512 one)."""
import os
import platform


def cpu():
    """The CPU's model name and core count (/proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as info:
            name = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "CPU"
    return f"{name}, {os.cpu_count()} cores"


def machine():
    """The CPU, the kernels torch dispatches to on it (AVX2, AVX512: they differ in speed and in the last
    bits), and the GPUs, if any."""
    import torch
    words = f"{cpu()}, torch {torch.backends.cpu.get_cpu_capability()} kernels"
    if torch.cuda.is_available():
        words += f", {torch.cuda.get_device_name(0)}"  # the model, not a count: a cell may use one of them
    return words
