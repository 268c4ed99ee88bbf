"""Builds ehm_fast._C (C++ CPU kernels always, CUDA kernels when available or forced).

Install with `pip install --no-build-isolation -e .` so the extension links against the torch
that runs it.

Environment:
  EHM_FAST_CUDA=1   force the CUDA build (compile-only on a machine without a GPU)
  EHM_FAST_CUDA=0   skip CUDA even when it is available
  TORCH_CUDA_ARCH_LIST   default "9.0" (Hopper)
  MAX_JOBS          default: from cores and memory (about 2 GiB per compile job)
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("EHM_FAST_CUDA", "").strip()
    if flag == "0":
        return False
    import torch
    from torch.utils import cpp_extension

    has_nvcc = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    if flag == "1":
        if torch.version.cuda is None:
            raise RuntimeError("EHM_FAST_CUDA=1 but this torch has no CUDA support: install a CUDA build of torch")
        if not has_nvcc:
            raise RuntimeError("EHM_FAST_CUDA=1 but nvcc was not found: set CUDA_HOME")
        return True
    return torch.version.cuda is not None and has_nvcc and torch.cuda.is_available()


def _default_max_jobs() -> None:
    if "MAX_JOBS" in os.environ:
        return
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    os.environ["MAX_JOBS"] = str(max(1, min(cores, int(mem_gib // 2))))


def _extensions():
    from torch.utils import cpp_extension

    if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        cpp_extension.CUDA_HOME = "/usr/local/cuda"
    _default_max_jobs()
    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp"]  # torch adds the C++ standard it was built with
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        return [
            cpp_extension.CUDAExtension(
                "ehm_fast._C",
                sources,
                include_dirs=include_dirs,
                define_macros=[("EHM_FAST_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        cpp_extension.CppExtension(
            "ehm_fast._C", sources, include_dirs=include_dirs, extra_compile_args=cxx, extra_link_args=["-fopenmp"]
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    # kernels/ stays at the top level and installs as ehm_fast.kernels; an editable install maps
    # the name to the same folder, so each file has one name in a checkout too.
    packages=sorted(set(find_packages(include=["ehm_fast", "ehm_fast.*"])) | {"ehm_fast.kernels"}),
    package_dir={"ehm_fast": "ehm_fast", "ehm_fast.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
