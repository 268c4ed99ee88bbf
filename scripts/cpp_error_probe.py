"""Which C++ extensions turn a thrown error into a crash on this machine?

On the H100 machine of 2026-11-27 (g++ 13.3, torch 2.11), a failed TORCH_CHECK in ehm_fast._C
ended the process with a segmentation fault instead of raising RuntimeError; on the CPU machines
it raises. This builds tiny extensions that differ in one respect each (how the error is thrown,
OpenMP, the GIL released, -O3, a CUDA source) and calls each in a child process, then calls the
installed ehm_fast._C the same way, loaded with and without its package. On the H200 machine of
2026-11-27 every tiny extension without a CUDA source raised (the CUDA variant was added after):

    python scripts/cpp_error_probe.py        # about a minute on 16 cores; prints a table
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

SOURCE = """
#include <torch/extension.h>
#include <stdexcept>
void fail(const at::Tensor& t) {
  if (THROW_STD) throw std::runtime_error("probe: std::runtime_error");
  TORCH_CHECK(t.dim() == 99, "probe: TORCH_CHECK failed");
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  if (RELEASE_GIL) m.def("fail", &fail, py::call_guard<py::gil_scoped_release>());
  else m.def("fail", &fail);
}
"""

CUDA_SOURCE = "__global__ void probe_kernel(float* x) { x[0] = 1.f; }\n"

VARIANTS = {  # name: (macros, extra cflags, extra ldflags, with a CUDA source)
    "TORCH_CHECK": ({}, [], [], False),
    "std::runtime_error": ({"THROW_STD": "1"}, [], [], False),
    "TORCH_CHECK, -fopenmp": ({}, ["-fopenmp"], ["-fopenmp"], False),
    "TORCH_CHECK, GIL released": ({"RELEASE_GIL": "1"}, [], [], False),
    "as ehm_fast._C: -O3 -fopenmp, GIL released": ({"RELEASE_GIL": "1"}, ["-O3", "-fopenmp"], ["-fopenmp"], False),
    "as ehm_fast._C, with a CUDA source": ({"RELEASE_GIL": "1"}, ["-O3", "-fopenmp"], ["-fopenmp"], True),
    # Debian/Ubuntu Pythons link extensions built by setuptools (as pip builds ehm_fast._C) with this
    "TORCH_CHECK, -Wl,-Bsymbolic-functions": ({}, [], ["-Wl,-Bsymbolic-functions"], False),
}

# The same tiny extension built by setuptools + torch's BuildExtension, as `pip install -e .` builds
# ehm_fast._C: with the compile and link flags of this Python's sysconfig, which load_inline skips.
SETUP = """
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension
setup(name="ehm_probe_st", ext_modules=[CppExtension("ehm_probe_st", ["probe.cpp"], extra_compile_args=["-O3", "-fopenmp"],
      define_macros=[("THROW_STD", "0"), ("RELEASE_GIL", "1")], extra_link_args=["-fopenmp"])],
      cmdclass={"build_ext": BuildExtension})
"""

# The installed extension, called as tests/test_optim_functional.py does (a bucket of two dtypes).
REAL_CALL = """
p = [torch.randn(3), torch.randn(3, dtype=torch.float64)]
try:
    C.cv_sgd_(p, [x.clone() for x in p], [], [], [], [], 0.0, 0.1, 0.0, 0.0, 0.0, False, False, None)
except RuntimeError as e:
    print("raised RuntimeError:", str(e).splitlines()[0])
"""
REAL = {
    "ehm_fast._C, through its package": "import torch\nfrom ehm_fast import _C as C\n",
    "ehm_fast._C, its .so alone": (
        "import glob, importlib.util, torch\n"
        "path = glob.glob('ehm_fast/_C*.so')[0]\n"
        "spec = importlib.util.spec_from_file_location('ehm_fast._C', path)\n"
        "C = importlib.util.module_from_spec(spec); spec.loader.exec_module(C)\n"
    ),
}

# A loaded tiny extension `mod`, called so that its check fails.
TINY_CALL = """
print("built", flush=True)
try:
    mod.fail(torch.zeros(1))
except RuntimeError as e:
    print("raised RuntimeError:", str(e).splitlines()[0])
"""

CHILD = """
import sys, torch
from torch.utils.cpp_extension import load_inline
macros, cflags, ldflags, cuda, name, build = {args}
src = "".join(f"#define {{k}} {{v}}\\n" for k, v in macros.items())
src += "#ifndef THROW_STD\\n#define THROW_STD 0\\n#endif\\n#ifndef RELEASE_GIL\\n#define RELEASE_GIL 0\\n#endif\\n"
mod = load_inline(name, cpp_sources=[src + {source!r}], cuda_sources=[{cuda_source!r}] if cuda else None,
                  extra_cflags=cflags, extra_ldflags=ldflags, build_directory=build, verbose=False)
""" + TINY_CALL.replace("{", "{{").replace("}", "}}")


def probe(index: int, name: str, spec: tuple, root: str) -> tuple[str, str]:
    build = os.path.join(root, f"v{index}")
    os.makedirs(build, exist_ok=True)
    code = CHILD.format(args=repr((*spec, f"ehm_probe_{index}", build)), source=SOURCE, cuda_source=CUDA_SOURCE)
    env = dict(os.environ)  # nvcc's libraries and a target even where no GPU is visible
    if os.path.isdir("/usr/local/cuda"):
        env.setdefault("CUDA_HOME", "/usr/local/cuda")
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    return name, verdict(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                                        env=env))


def probe_setuptools(root: str) -> tuple[str, str]:
    build = os.path.join(root, "setuptools")
    os.makedirs(build)
    with open(os.path.join(build, "probe.cpp"), "w") as f:
        f.write(SOURCE)
    with open(os.path.join(build, "setup.py"), "w") as f:
        f.write(SETUP)
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=build, capture_output=True, text=True)
    links = [line for line in r.stdout.splitlines() if " -shared " in line]
    print("setuptools link line:", links[-1] if links else "(none: " + r.stderr.strip()[-200:] + ")", flush=True)
    code = "import torch, ehm_probe_st as mod\n" + TINY_CALL
    child = subprocess.run([sys.executable, "-c", code], cwd=build, capture_output=True, text=True, timeout=120)
    return "TORCH_CHECK, built by setuptools like ehm_fast._C", verdict(child)


def verdict(r: subprocess.CompletedProcess) -> str:
    if "raised RuntimeError" in r.stdout:
        return "raises RuntimeError"
    if "built" not in r.stdout:
        return "did not load: " + (r.stderr.strip().splitlines() or ["?"])[-1][:80]
    return f"crashed (exit status {r.returncode})"


def main() -> None:
    compiler = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    import torch

    print(f"torch {torch.__version__}; {compiler[0] if compiler else 'no c++ found'}", flush=True)
    with tempfile.TemporaryDirectory() as root, ThreadPoolExecutor(len(VARIANTS)) as pool:
        results = list(pool.map(lambda a: probe(*a, root), [(i, n, s) for i, (n, s) in enumerate(VARIANTS.items())]))
        results.append(probe_setuptools(root))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, load in REAL.items():
        code = load + "print('built', flush=True)\n" + REAL_CALL
        results.append((name, verdict(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                     timeout=120, cwd=repo))))
    width = max(len(n) for n, _ in results)
    for name, outcome in results:
        print(f"{name:{width}s}  {outcome}")


if __name__ == "__main__":
    main()
