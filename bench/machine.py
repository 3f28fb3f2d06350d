"""What a benchmark ran on, for its results header: the CPU's name and the accelerator."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    names = (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    return next(names, platform.processor())


def accelerator() -> str:
    """What the model ran on: the server and `load_model` pick CUDA when torch sees a GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return "CPU only"
