"""What every bench result records about where and with what it was measured."""
from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip()
        # results written by earlier runs are not the code being measured: a dirty bench/results
        # does not mark the commit
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)bench/results"], cwd=here, capture_output=True, text=True).stdout.strip()
        return commit + ("+uncommitted" if dirty else "") if commit else "unknown"
    except OSError:
        return "unknown"


def machine_info() -> dict:
    import torch
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    versions = {}
    for package in ("hashindex", "torch", "numpy", "numba", "faiss-gpu", "zarr", "dask", "distributed"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpus": gpus or None, "python": platform.python_version(),
            "versions": versions, "git_commit": git_commit()}
