"""The issue's performance targets, checked against a run's results.

CPU, at N=2048, V=32000 fp32, for the compiled "cpu" backend: forward+backward at least 3x faster
than the eager reference and 1.5x faster than torch.compile of it; extra peak memory at most 5% of
the eager reference's. GPU, at N=16384, V=151936 bf16 (SPEC section 4's example), for each of the
"cuda" and "triton" backends: at least 85% of the measured copy bandwidth for the bytes the
forward+backward moves, forward+backward within 1.25x of the two-pass floor (one read, one write
at the datasheet bandwidth, else at the copy bandwidth), and at least 2x faster than Liger.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from .cases import TARGET_CPU, TARGET_GPU, Case


def _speedup(row, base):
    return base["fwdbwd_ms"] / row["fwdbwd_ms"]


@dataclass(frozen=True)
class Spec:
    what: str
    need: float
    at_least: bool  # met when value >= need, else when value <= need
    baseline: Optional[str]  # the implementation compared with, if any
    value: Callable[[dict, Optional[dict]], float]  # (backend's row, baseline's row) -> value

    @property
    def need_text(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.need:g}"


SPECS = {
    "cpu": (TARGET_CPU, ("cpu",), [
        Spec("fwd+bwd speed-up vs eager", 3.0, True, "eager", _speedup),
        Spec("fwd+bwd speed-up vs compile", 1.5, True, "compile", _speedup),
        Spec("extra peak memory / eager's", 0.05, False, "eager",
             lambda row, base: row["extra_peak_MB"] / base["extra_peak_MB"]),
    ]),
    "cuda": (TARGET_GPU, ("cuda", "triton"), [
        Spec("fwd+bwd GB/s / copy GB/s", 0.85, True, None, lambda row, base: row["fwdbwd_frac_copy"]),
        Spec("fwd+bwd time / 2-pass floor", 1.25, False, None, lambda row, base: row["fwdbwd_x_floor"]),
        Spec("fwd+bwd speed-up vs liger", 2.0, True, "liger", _speedup),
    ]),
}


@dataclass
class Target:
    backend: str
    case: str
    what: str
    need: str
    got: Optional[float]  # None: not measured
    status: str  # "met", "MISSED by ...", or "not measured: <why>"


def _find(results, case: Case, impl: str):
    return next((r for r in results if r["case"] == case.label and r["impl"] == impl and not r["error"]), None)


def evaluate(results: List[dict], device_type: str, available: List[str], skipped: Dict[str, str]) -> List[Target]:
    """Every target of the device type: met, missed (and by how much) or not measured (and why).

    available: the package's backends on the device; skipped: {baseline: why} for absent baselines.
    """
    case, backends, specs = SPECS[device_type]
    out = []
    for backend in backends:
        row = _find(results, case, backend)
        for spec in specs:
            base = _find(results, case, spec.baseline) if spec.baseline else None
            if backend not in available:
                why = f"{backend} not available"
            elif row is None:
                why = f"{backend} not run at {case.label}"
            elif spec.baseline in skipped:
                why = f"{spec.baseline} not available"
            elif spec.baseline and base is None:
                why = f"{spec.baseline} not run at {case.label}"
            else:
                why = None
            if why is not None:
                out.append(Target(backend, case.label, spec.what, spec.need_text, None, f"not measured: {why}"))
                continue
            got = spec.value(row, base)
            met = got >= spec.need if spec.at_least else got <= spec.need
            # by how much: the factor the value must still improve by
            factor = spec.need / got if spec.at_least else got / spec.need
            status = "met" if met else f"MISSED by {factor:.2f}x"
            out.append(Target(backend, case.label, spec.what, spec.need_text, got, status))
    return out
