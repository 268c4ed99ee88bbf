"""Which C++ extensions turn a thrown error into a crash on this machine?

On the H100 machine of 2026-11-27 (g++ 13.3, torch 2.11), a failed TORCH_CHECK in ehm_fast._C
ended the process with a segmentation fault instead of raising RuntimeError; on the CPU machines
it raises. This builds tiny extensions that differ in one respect each (how the error is thrown,
OpenMP, the GIL released, -O3) and calls each in a child process:

    python benchmarks/cpp_error_probe.py        # about a minute on 16 cores; prints a table
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

VARIANTS = {  # name: (macros, extra cflags, extra ldflags)
    "TORCH_CHECK": ({}, [], []),
    "std::runtime_error": ({"THROW_STD": "1"}, [], []),
    "TORCH_CHECK, -fopenmp": ({}, ["-fopenmp"], ["-fopenmp"]),
    "TORCH_CHECK, GIL released": ({"RELEASE_GIL": "1"}, [], []),
    "as ehm_fast._C: -O3 -fopenmp, GIL released": ({"RELEASE_GIL": "1"}, ["-O3", "-fopenmp"], ["-fopenmp"]),
}

CHILD = """
import sys, torch
from torch.utils.cpp_extension import load_inline
macros, cflags, ldflags, name, build = {args}
src = "".join(f"#define {{k}} {{v}}\\n" for k, v in macros.items())
src += "#ifndef THROW_STD\\n#define THROW_STD 0\\n#endif\\n#ifndef RELEASE_GIL\\n#define RELEASE_GIL 0\\n#endif\\n"
mod = load_inline(name, cpp_sources=[src + {source!r}], extra_cflags=cflags, extra_ldflags=ldflags,
                  build_directory=build, verbose=False)
print("built", flush=True)
try:
    mod.fail(torch.zeros(1))
except RuntimeError as e:
    print("raised RuntimeError:", str(e).splitlines()[0])
"""


def probe(index: int, name: str, spec: tuple, root: str) -> tuple[str, str]:
    macros, cflags, ldflags = spec
    build = os.path.join(root, f"v{index}")
    os.makedirs(build, exist_ok=True)
    code = CHILD.format(args=repr((macros, cflags, ldflags, f"ehm_probe_{index}", build)), source=SOURCE)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if "raised RuntimeError" in r.stdout:
        return name, "raises RuntimeError"
    if "built" not in r.stdout:
        return name, "build failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:80]
    return name, f"crashed (exit status {r.returncode})"


def main() -> None:
    compiler = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    import torch

    print(f"torch {torch.__version__}; {compiler[0] if compiler else 'no c++ found'}", flush=True)
    with tempfile.TemporaryDirectory() as root, ThreadPoolExecutor(len(VARIANTS)) as pool:
        results = list(pool.map(lambda a: probe(*a, root), [(i, n, s) for i, (n, s) in enumerate(VARIANTS.items())]))
    width = max(len(n) for n in VARIANTS)
    for name, outcome in results:
        print(f"{name:{width}s}  {outcome}")


if __name__ == "__main__":
    main()
