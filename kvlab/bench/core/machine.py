"""What a result was measured on, recorded with every report, and the kernels made ready before timing."""

import os
import platform
import re
from pathlib import Path

import psutil
import torch
import transformers

from kvlab.kernels import cpu as cpu_kernels


def cpu_model() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def machine_info(device: torch.device | str = "cpu") -> dict:
    """The machine and software a result came from; `kernels` names what ran the model on `device`."""
    if torch.device(device).type == "cuda":
        kernels = (
            "CUDA: the engine's attention backend (auto: Triton paged attention, float32 tiles as 3xTF32, "
            "where triton imports), torch for the rest"
        )
    else:
        kernels = cpu_kernels.describe()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "kernels": kernels,
    }


def prepare_kernels() -> None:
    """Build and calibrate kvlab's CPU kernels now, before any timed region, so that neither a
    first-use compile (tens of seconds) nor a calibration falls inside a measured time. Call it after
    setting torch's thread count: the calibration is per thread count."""
    prepare = getattr(cpu_kernels, "prepare", None)
    if prepare is not None:
        prepare()
    else:  # kernels without a prepare(): available() builds them
        cpu_kernels.available()
