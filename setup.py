"""Build definition of deltal-kernels (the one place that lists what gets built).

The compiled extension ``deltal_kernels._C`` (csrc/, torch.utils.cpp_extension + ninja):
- CPU kernels whenever torch is importable and a C++ compiler is found; otherwise (or with
  DELTAL_KERNELS_NO_EXTENSION=1) the package installs as pure Python (Triton + torch backends).
- CUDA kernels in addition when a usable CUDA toolkit is found (CUDA_HOME / CUDA_PATH, else the
  toolkit of the real nvcc behind the one on PATH, else /usr/local/cuda) whose major version matches
  torch.version.cuda; DELTAL_KERNELS_NO_CUDA=1 skips them. Architectures: TORCH_CUDA_ARCH_LIST,
  default "8.0;9.0+PTX" (sm_80 and sm_90 machine code, plus sm_90 PTX for newer GPUs).
Once a compiler was found, a failing compile is an install error, never a silent skip.
Extra flags for the C++ sources (e.g. AddressSanitizer, `make test-asan`): DELTAL_KERNELS_CXXFLAGS
(compile) and DELTAL_KERNELS_LDFLAGS (link), whitespace-separated.
Sources: every csrc/*.cpp, csrc/cpu/*.cpp and (with CUDA) csrc/cuda/*.cu; CMakeLists.txt globs the same.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def log(msg: str) -> None:
    print(f"deltal-kernels setup: {msg}", file=sys.stderr, flush=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def sources(*patterns):
    """The source files matching csrc/ glob patterns, relative to this file (sorted, stable)."""
    return sorted(str(Path(p).relative_to(ROOT)) for pat in patterns for p in glob.glob(str(ROOT / pat)))


# ---- the C++ compiler -------------------------------------------------------------------------

def find_cxx():
    """The C++ compiler torch.utils.cpp_extension will call (CXX, else c++/g++/clang++), or None."""
    candidates = [os.environ["CXX"].split()[0]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for name in candidates:
        path = shutil.which(name)
        if path is None:
            continue
        try:
            subprocess.run([path, "--version"], check=True, capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        return path
    return None


# ---- the CUDA toolkit -------------------------------------------------------------------------

def _has_cudart(home: Path) -> bool:
    libdirs = [home / "lib64", home / "lib", *home.glob("targets/*/lib")]
    return any(any(d.glob("libcudart.so*")) or any(d.glob("cudart*.lib")) for d in libdirs if d.is_dir())


def _is_toolkit(home) -> bool:
    home = Path(home)
    nvcc = home / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")
    return nvcc.is_file() and _has_cudart(home)


def _real_nvcc_home(nvcc: str):
    """The toolkit behind an nvcc found on PATH, which may be a symlink or a wrapper script."""
    real = Path(os.path.realpath(nvcc))
    if _is_toolkit(real.parent.parent):
        return real.parent.parent
    # a wrapper: nvcc itself reports where it lives (the _HERE_ line of a dry run)
    try:
        dry = subprocess.run([nvcc, "-dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60)
        match = re.search(r"_HERE_=(\S+)", dry.stdout + dry.stderr)
    except (OSError, subprocess.SubprocessError):
        match = None
    if match and _is_toolkit(Path(match.group(1)).parent):
        return Path(match.group(1)).parent.resolve()
    return None


def find_cuda_home():
    """(toolkit directory, how it was found), or (None, why not)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            if _is_toolkit(os.environ[var]):
                return Path(os.environ[var]), f"${var}"
            log(f"${var}={os.environ[var]} has no bin/nvcc and libcudart; looking elsewhere")
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _real_nvcc_home(nvcc)
        if home is not None:
            return home, f"the toolkit of {nvcc}"
    for candidate in ("/usr/local/cuda", "/opt/cuda"):
        if _is_toolkit(candidate):
            return Path(candidate), "default location"
    return None, "no CUDA toolkit (no CUDA_HOME, no nvcc on PATH, no /usr/local/cuda)"


def nvcc_version(home: Path):
    out = subprocess.run([str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True, timeout=120)
    match = re.search(r"release (\d+)\.(\d+)", out.stdout)
    return (int(match.group(1)), int(match.group(2))) if match else None


def plan_cuda(torch):
    """(CUDA_HOME to build with, or None) and the reason when None."""
    if env_flag("DELTAL_KERNELS_NO_CUDA"):
        return None, "DELTAL_KERNELS_NO_CUDA is set"
    if not torch.version.cuda:
        return None, f"torch {torch.__version__} is not a CUDA build"
    home, how = find_cuda_home()
    if home is None:
        return None, how
    version = nvcc_version(home)
    if version is None:
        return None, f"could not read the version of {home}/bin/nvcc"
    torch_major = int(torch.version.cuda.split(".")[0])
    if version[0] != torch_major:
        return None, (f"nvcc {version[0]}.{version[1]} in {home} does not match torch's CUDA {torch.version.cuda} "
                      "(major versions must agree)")
    log(f"CUDA toolkit {home} ({how}), nvcc {version[0]}.{version[1]}, torch CUDA {torch.version.cuda}")
    return home, None


# ---- the extension ----------------------------------------------------------------------------

def extension_build():
    """(ext_modules, cmdclass): the compiled extension, or nothing for a pure-Python install."""
    if env_flag("DELTAL_KERNELS_NO_EXTENSION"):
        log("DELTAL_KERNELS_NO_EXTENSION is set: pure-Python install (Triton and torch backends)")
        return [], {}
    try:
        import torch
    except ImportError:
        log("torch is not importable at build time (build with --no-build-isolation): pure-Python install")
        return [], {}
    if find_cxx() is None:
        log("no C++ compiler found ($CXX, c++, g++, clang++): pure-Python install (Triton and torch backends)")
        return [], {}

    cuda_home, why_not = plan_cuda(torch)
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported
        os.environ["CUDA_HOME"] = str(cuda_home)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    else:
        log(f"building the CPU extension only: {why_not}")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    include = [str(ROOT / "csrc" / "include")]
    cxx_flags = ["-O3", "-Wall"] if os.name != "nt" else ["/O2"]
    extra_cxx = os.environ.get("DELTAL_KERNELS_CXXFLAGS", "").split()
    link_flags = os.environ.get("DELTAL_KERNELS_LDFLAGS", "").split()
    cxx_flags += extra_cxx
    if extra_cxx or link_flags:
        log(f"extra C++ flags: compile {' '.join(extra_cxx) or '-'}, link {' '.join(link_flags) or '-'}")
    macros = [("DK_VERSION", f'"{VERSION}"')]
    cpp_sources = sources("csrc/*.cpp", "csrc/cpu/*.cpp")
    log("sources: " + ", ".join(cpp_sources + (sources("csrc/cuda/*.cu") if cuda_home is not None else [])))
    if cuda_home is not None:
        log(f"CUDA architectures: {os.environ['TORCH_CUDA_ARCH_LIST']}")
        ext = CUDAExtension(
            "deltal_kernels._C",
            cpp_sources + sources("csrc/cuda/*.cu"),
            include_dirs=include,
            define_macros=macros + [("DK_WITH_CUDA", None)]
            + ([("DK_CUDA_PTX", None)] if "PTX" in os.environ["TORCH_CUDA_ARCH_LIST"].upper() else []),
            extra_link_args=link_flags,
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler=-Wall",
                                         "-Werror=all-warnings"]},
        )
    else:
        ext = CppExtension("deltal_kernels._C", cpp_sources, include_dirs=include, define_macros=macros,
                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    class BuildExt(BuildExtension):
        """An editable install (pip install -e, make install) compiles in a fixed build/ folder
        instead of a fresh temporary one, so ninja rebuilds only what changed."""

        def finalize_options(self):
            super().finalize_options()
            if getattr(self, "editable_mode", False):
                self.build_temp = str(ROOT / "build" / f"temp-editable-{sys.implementation.cache_tag}")

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_build()

setup(
    name="deltal-kernels",
    version=VERSION,
    description="RLVR policy loss straight from the logits: fused log-prob, PPO clipping, KL, entropy and "
                "Delta-L aggregation in Triton, CUDA C++ and C++",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # what is tested: Python 3.11 + torch 2.14.1 (make test), Python 3.12 + torch 2.11.0 (make test-compat,
    # the GPU machine's stack); older ones are not
    python_requires=">=3.11",
    packages=find_packages(include=["deltal_kernels", "deltal_kernels.*"]),
    install_requires=["torch>=2.11"],
    extras_require={"bench": ["rich", "matplotlib", "liger-kernel"], "test": ["pytest", "hypothesis"],
                    "trl": ["trl"], "liger": ["liger-kernel"]},
    entry_points={"console_scripts": ["deltal-bench = deltal_kernels.bench:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
