"""backend="cpu" and backend="cuda": the compiled C++/CUDA extension (``deltal_kernels._C``).

Implements the row contract of ``dispatch`` with the ops ``torch.ops.deltal_kernels_ext.*``
registered by csrc/bindings.cpp (CPU and CUDA kernels, Meta kernels for tracing). Importing this
module never fails: when the extension was not built (pure-Python install, no compiler) or was
built without CUDA, ``unavailable_reason`` says so and dispatch reports it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)

    _IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = str(e)

_INFO_CACHE: Optional[dict] = None

# Read by the CUDA kernels at each launch: "auto" (unset), "1" (one block per row) or a cluster size
# 2, 4, 8, 16 (README: performance model)
CLUSTER_SETTING = "DELTAL_KERNELS_CUDA_CLUSTER"


def _ops():
    return torch.ops.deltal_kernels_ext


def _raw_info() -> dict:
    """The build facts compiled into the library ("key=value" lines of build_info())."""
    global _INFO_CACHE
    if _INFO_CACHE is None:
        text = _ops().build_info()
        _INFO_CACHE = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return _INFO_CACHE


def cuda_built() -> bool:
    return _C is not None and _raw_info().get("cuda_built") == "1"


def compiled_archs() -> list:
    """Compute capabilities compiled as machine code (e.g. [80, 90]), from __CUDA_ARCH_LIST__."""
    if not cuda_built():
        return []
    return [int(a) // 10 for a in _raw_info().get("cuda_arch_list", "").split(",") if a.strip()]


def _arch_reason(device: torch.device) -> Optional[str]:
    major, minor = torch.cuda.get_device_capability(device)
    cc = major * 10 + minor
    archs = compiled_archs()
    if not archs or cc in archs:
        return None
    # PTX of the highest arch (TORCH_CUDA_ARCH_LIST "+PTX") is JIT-compiled for newer devices
    if _raw_info().get("cuda_ptx") == "1" and cc > max(archs):
        return None
    same_major = [a for a in archs if a // 10 == major and a <= cc]
    if same_major:  # sm_XY machine code runs on sm_XZ, Z >= Y
        return None
    return (f"the extension was compiled for {', '.join(f'sm_{a}' for a in archs)}; the device {device} is "
            f"sm_{cc} (rebuild with TORCH_CUDA_ARCH_LIST including {major}.{minor})")


def unavailable_reason(device) -> Optional[str]:
    """None when the compiled kernels can run tensors on ``device``, else why not."""
    device = torch.device(device)
    if _C is None:
        return (f"the compiled extension deltal_kernels._C is not available ({_IMPORT_ERROR}); install with a C++ "
                "compiler present: pip install --no-build-isolation .")
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not cuda_built():
            return ("the compiled extension was built without its CUDA part (no usable nvcc matching torch's CUDA "
                    "version at build time; see the pip build log)")
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return _arch_reason(device)
    return f"the compiled extension runs cpu and cuda tensors, not {device.type}"


def forward_rows(logits, targets, scored, old_logprobs, ref_logprobs, advantages, p, need_entropy):
    """The forward row contract (see ``dispatch``): (logp, entropy, lse, loss, dlogp, kl, flags)."""
    return _ops().forward_rows(logits, targets, scored, old_logprobs, ref_logprobs, advantages, p.clip_low,
                               p.clip_high, p.dual_clip, p.kl_coef, p.kl_type, p.entropy_coef, p.temperature,
                               need_entropy)


def grad_rows(logits, targets, lse, entropy, g, h, temperature, out):
    """The gradient row contract (see ``dispatch``): writes dL/dlogits into ``out`` (may be ``logits``)."""
    _ops().grad_rows(logits, targets, lse, entropy, g, h, temperature, out)


def forward_grad_rows(logits, targets, scored, old_logprobs, ref_logprobs, advantages, p, need_entropy, row_weights,
                      grad_scale, out):
    """The fused row contract (see ``dispatch``): ``forward_rows``' outputs, and the gradient of
    ``grad_scale * sum_t row_weights[t] * loss[t]`` w.r.t. the logits written into ``out`` (may be
    ``logits``) by the same pass over each row; the same bits as ``grad_rows`` with
    g = (grad_scale * w) * dlogp and h = (grad_scale * w) * -entropy_coef."""
    return _ops().forward_grad_rows(logits, targets, scored, old_logprobs, ref_logprobs, advantages, p.clip_low,
                                    p.clip_high, p.dual_clip, p.kl_coef, p.kl_type, p.entropy_coef, p.temperature,
                                    need_entropy, row_weights.to(torch.float32), float(grad_scale), out)


def shard_stats(logits, targets, scored, vocab_start, temperature, need_entropy):
    """The shard row contract (see ``dispatch``): (m, s, u, zt) of one vocabulary shard of each row."""
    return _ops().shard_stats(logits, targets, scored, vocab_start, temperature, need_entropy)


def shard_grad_rows(logits, targets, vocab_start, m, log_s, entropy, g, h, temperature, out):
    """The shard gradient contract (see ``dispatch``): writes the shard's dL/dlogits into ``out`` (may be
    ``logits``) from the merged row statistics."""
    _ops().shard_grad_rows(logits, targets, vocab_start, m, log_s, entropy, g, h, temperature, out)


def build_info() -> dict:
    """Build facts for bug reports (``python -m deltal_kernels``)."""
    if _C is None:
        return {"compiled extension": f"not available ({_IMPORT_ERROR})"}
    raw = _raw_info()
    info = {"compiled extension": f"{os.path.basename(_C.__file__)} (built with {raw.get('cxx', 'unknown compiler')})",
            "compiled backends": "cpu, cuda" if cuda_built() else "cpu",
            "CUDA part built": "yes" if cuda_built() else "no"}
    if cuda_built():
        archs = ", ".join(f"sm_{a}" for a in compiled_archs())
        info["CUDA archs compiled"] = archs + (" (+PTX)" if raw.get("cuda_ptx") == "1" else "")
        info["nvcc version (build)"] = raw.get("nvcc_version", "unknown")
        info[CLUSTER_SETTING] = os.environ.get(CLUSTER_SETTING) or "auto (unset)"
    info["torch CUDA version"] = torch.version.cuda or "none"
    return info


def clusters_unavailable_reason(device=None) -> Optional[str]:
    """None when the cuda backend can split rows over thread-block clusters on ``device`` (the
    current CUDA device by default), else why not."""
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    reason = unavailable_reason("cuda")
    if reason is not None:
        return f"CUDA backend: {reason}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return f"thread-block clusters need compute capability 9.0 or newer (this GPU: {major}.{minor})"
    return None


@contextlib.contextmanager
def cluster_setting(value: str) -> Iterator[None]:
    """CLUSTER_SETTING = value inside the block; the caller's value (or none) again after it."""
    previous = os.environ.get(CLUSTER_SETTING)
    os.environ[CLUSTER_SETTING] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[CLUSTER_SETTING]
        else:
            os.environ[CLUSTER_SETTING] = previous
