"""``python -m deltal_kernels``: backends, versions and build facts, for bug reports."""
from __future__ import annotations

import platform

import torch

import deltal_kernels as dk
from deltal_kernels.dispatch import BACKEND_MODULES, unavailable_reason


def report() -> str:
    lines = [f"deltal_kernels {dk.__version__}", f"python {platform.python_version()}",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    try:
        from deltal_kernels import extension

        lines.extend(f"{k}: {v}" for k, v in extension.build_info().items())
    except ImportError as e:
        lines.append(f"compiled extension: not available ({e})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        lines.append(f"backends for {device} tensors (auto order): {', '.join(dk.available_backends(device))}")
        for name in BACKEND_MODULES:
            reason = unavailable_reason(name, device)
            if reason is not None:
                lines.append(f"  {name}: {reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
