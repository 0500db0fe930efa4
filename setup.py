"""Build of rnn_fused._C: the C++ operators always, the CUDA kernels whenever a toolkit is found.

Environment:
  USE_CUDA=0             build without CUDA even where a toolkit exists
  FORCE_CUDA=1           fail when no CUDA toolkit is found
  CUDA_HOME / CUDA_PATH  the toolkit root (found from nvcc on PATH otherwise)
  TORCH_CUDA_ARCH_LIST   GPU architectures; with no GPU and nothing set: 9.0 (H100)
  RNN_FUSED_SIMD         avx512 | avx2 | default: the SIMD level of the CPU kernels
                         (default: the best this machine supports)
  MAX_JOBS               parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _log(msg: str) -> None:
    print(f"rnn_fused setup: {msg}", file=sys.stderr)


def _is_toolkit_root(root: str | None) -> bool:
    if not root:
        return False
    r = Path(root)
    has_nvcc = (r / "bin" / "nvcc").exists()
    has_cudart = any(r.glob("lib64/libcudart.so*")) or any(r.glob("targets/*/lib/libcudart.so*"))
    return has_nvcc and has_cudart


def _roots_from_nvcc(nvcc: str) -> list[str]:
    """Candidate toolkit roots for an nvcc on PATH, which may be a symlink or a wrapper script."""
    real = os.path.realpath(nvcc)
    roots = [str(Path(real).parent.parent)]
    try:
        head = Path(real).read_bytes()[:4096]
    except OSError:
        return roots
    if head.startswith(b"#!"):  # a wrapper: look for the real nvcc it runs
        for m in re.finditer(rb"(/[^\s\"']+)/bin/nvcc\b", head):
            roots.append(m.group(1).decode())
    return roots


def find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if _is_toolkit_root(value):
                return value
            _log(f"ignoring {var}={value}: no bin/nvcc and libcudart there")
    candidates: list[str] = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += _roots_from_nvcc(nvcc)
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    return next((c for c in candidates if _is_toolkit_root(c)), None)


def nvidia_wheel_includes() -> list[str]:
    """Include folders of the nvidia-* wheels that the CUDA build of torch installs.

    They hold headers (cublas_v2.h, cusparse.h, ...) that ATen/cuda/CUDAContext.h needs and
    that a bare toolkit may lack. Searched after every other folder, so the toolkit's own
    headers win where both have one.
    """
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for base in spec.submodule_search_locations:
        found += sorted(str(p) for p in Path(base).glob("*/include") if p.is_dir())
    return found


def simd_flags() -> tuple[list[str], str]:
    """Compiler flags that make at::vec use this CPU's widest SIMD in the CPU kernels."""
    wanted = os.environ.get("RNN_FUSED_SIMD", "").lower()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags
    avx2 = {"avx2", "fma", "f16c"} <= flags
    if not wanted:
        wanted = "avx512" if avx512 else "avx2" if avx2 else "default"
    if wanted == "avx512":
        return [
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            "-mfma",
            "-DCPU_CAPABILITY=AVX512",
            "-DCPU_CAPABILITY_AVX512",
        ], wanted
    if wanted == "avx2":
        # F16C: the cell math's float16 outputs convert with vcvtps2ph (every AVX2 CPU has it).
        avx2_flags = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
        return avx2_flags, wanted
    if wanted != "default":
        raise SystemExit(f"RNN_FUSED_SIMD must be avx512, avx2 or default, got {wanted!r}")
    return ["-DCPU_CAPABILITY=DEFAULT"], wanted


def nvcc_release(cuda_home: str) -> tuple[int, int]:
    """The toolkit's nvcc release, (major, minor); (0, 0) where it does not say."""
    import subprocess

    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True
        ).stdout
    except OSError:
        return (0, 0)
    found = re.search(r"release (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def build_extension():
    use_cuda = os.environ.get("USE_CUDA", "1") != "0"
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    cuda_home = find_cuda_home() if use_cuda else None
    if force_cuda and not cuda_home:
        raise SystemExit("FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    simd, simd_name = simd_flags()
    _log(f"CPU kernels use SIMD level {simd_name}")
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    after = [f for inc in nvidia_wheel_includes() for f in ("-idirafter", inc)]
    cxx = ["-O3", "-fopenmp", *simd, *after]
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if cuda_home:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
            _log("no GPU visible and TORCH_CUDA_ARCH_LIST unset: building CUDA code for 9.0")
        _log(f"CUDA toolkit at {cuda_home}, arch list {os.environ.get('TORCH_CUDA_ARCH_LIST')}")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        nvcc = ["-O3", "--expt-relaxed-constexpr"]
        # The kernels' many instantiations (cells x dtypes x tiles x variants) are optimised
        # on all cores (nvcc 12+): 139 s -> 103 s for recurrence_cuda.cu on 2 cores.
        if nvcc_release(cuda_home) >= (12, 0):
            nvcc.append("--split-compile=0")
        nvcc += [f for inc in nvidia_wheel_includes() for f in ("-Xcompiler", f"-idirafter{inc}")]
        kwargs["extra_compile_args"]["nvcc"] = nvcc
        kwargs["define_macros"] = [("RNN_FUSED_WITH_CUDA", "1")]
        ext = CUDAExtension("rnn_fused._C", sources, **kwargs)
    else:
        _log("no CUDA toolkit (or USE_CUDA=0): building the CPU operators only")
        ext = CppExtension("rnn_fused._C", sources, **kwargs)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = build_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
