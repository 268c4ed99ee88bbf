"""Compiles every Triton kernel of ehm_fast for a GPU target on a machine without a GPU.

The wrappers of ehm_fast.kernels run on CPU tensors at training sizes; each `kernel[grid](...)`
launch is intercepted, specialised by triton's own binder (argument types, constexprs, 16-byte
alignment, ints equal to 1) and compiled with triton.compile for the target (sm_90 by default)
instead of launched. ptxas -v (triton's own) then reports registers and spills of each kernel.
Nothing runs: this catches compile errors and register spills, not wrong results.

    python scripts/triton_compile_check.py [--arch 90] [--quick]

Prints one line per distinct compiled specialisation and exits 1 if any failed. Needs the triton
of this machine (tested with 3.6 and 3.8) and its bundled ptxas; TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from ehm_fast import kernels as K  # noqa: E402
from ehm_fast.nn.bias_act import ACTIVATIONS as BIAS_ACTIVATIONS  # noqa: E402
from ehm_fast.ops.contract import acc_dtype  # noqa: E402


@dataclass
class Result:
    name: str
    key: str
    ok: bool
    grid: tuple = ()
    regs: int = -1
    spill: str = ""
    shared: int = 0
    error: str = ""
    notes: list[str] = field(default_factory=list)


class Compiler:
    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.results: dict[str, Result] = {}
        self.ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        self.arch = arch

    def launch(self, fn: JITFunction, grid, args, kwargs) -> None:
        grid = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
        binder = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, options = binder(*args, **kwargs)
        options_, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization, options)
        key = f"{fn.__name__}:{sorted(signature.items())}:{sorted((str(k), str(v)) for k, v in constexprs.items())}:" \
              f"{sorted(attrs.items())}:{options_.num_warps}"
        if key in self.results:
            return
        consts = {fn.arg_names[p[0]]: v for p, v in constexprs.items() if len(p) == 1}
        first_ptr = next((v for v in signature.values() if str(v).startswith("*")), "")
        res = Result(fn.__name__, f"{first_ptr} " + ", ".join(f"{k}={v}" for k, v in consts.items()), False, grid)
        self.results[key] = res
        for axis, size in enumerate(grid):
            limit = 2**31 - 1 if axis == 0 else 65535
            if int(size) > limit:
                res.notes.append(f"grid[{axis}]={size} > {limit}")
            if int(size) == 0:
                res.notes.append(f"grid[{axis}] is 0")
        try:
            src = ASTSource(fn, signature, constexprs, attrs)
            compiled = triton.compile(src, target=self.target, options=options_.__dict__)
            res.shared = compiled.metadata.shared
            res.regs, res.spill = self._ptxas_stats(compiled.asm["ptx"])
            res.ok = True
        except Exception as exc:  # report every failure, keep going
            res.error = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-3000:]

    def _ptxas_stats(self, ptx: str) -> tuple[int, str]:
        arch = f"sm_{self.arch}a" if self.arch >= 90 else f"sm_{self.arch}"
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        try:
            out = subprocess.run([self.ptxas, f"-arch={arch}", "-v", f.name, "-o", os.devnull], capture_output=True,
                                 text=True).stderr
        finally:
            os.unlink(f.name)
        regs = re.search(r"Used (\d+) registers", out)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
        stack = re.search(r"(\d+) bytes stack frame", out)
        text = ""
        if spill and (int(spill.group(1)) or int(spill.group(2))):
            text = f"spill {spill.group(1)}/{spill.group(2)} B"
        if stack and int(stack.group(1)):
            text += f" stack {stack.group(1)} B"
        return (int(regs.group(1)) if regs else -1), text.strip()


def _workloads(quick: bool) -> list[tuple[str, callable]]:
    """(label, thunk) pairs calling each wrapper at the sizes training and the benchmarks use."""
    # sizes of 1 matter: triton specialises an int argument equal to 1 into a constexpr
    img = (64, 3 * 64 * 64) if not quick else (4, 300)
    big_img = (16384, 3 * 64 * 64) if not quick else (8, 300)
    code = (256, 100) if not quick else (4, 10)
    lp = [(64, 64), (256, 1 << 20), (4, 1 << 20), (1, 100), (3, 1)] if not quick else [(4, 7), (1, 50000), (1, 1)]
    vamp = [(256, 100, 500), (1024, 100, 500), (8, 2, 3), (64, 512, 50), (1, 1, 1)] if not quick else [(4, 10, 5), (1, 1, 1)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    jobs = []

    for dt in dtypes:
        lp_dt = lp + [(1, 2**31 + 5)] if dt == torch.bfloat16 and not quick else lp  # int64 sizes (never touched)
        for rows, m in lp_dt:
            s = torch.empty(rows, m, dtype=dt)
            for has_p in (False, True):
                for jensen in (False, True):
                    p = torch.empty_like(s) if has_p else None

                    def run(s=s, p=p, jensen=jensen):
                        _, lse = K.log_partition_fwd(s, p, jensen)
                        g = torch.empty(s.shape[0], dtype=s.dtype)
                        K.log_partition_bwd(g, s, p, lse, jensen, True, p is not None)
                    jobs.append((f"log_partition {dt} {tuple(s.shape)} p={has_p} jensen={jensen}", run))

        for rows, d in (img, big_img, (1, 1)):
            x = torch.empty(rows, d, dtype=dt)
            scale = torch.empty(d, dtype=acc_dtype(dt))
            for kind in (0, 1, 2):
                def run(x=x, scale=scale, kind=kind):
                    ls = None if kind == 2 else scale
                    K.image_nll_fwd(x, x, ls, kind)
                    K.image_nll_bwd(torch.empty(x.shape[0], dtype=x.dtype), x, x, ls, kind, True, True, True)
                jobs.append((f"image_nll {dt} {tuple(x.shape)} kind={kind}", run))

        for kind, shape in itertools.product((0, 1, 2, 3), (code, (1, 1))):
            a = torch.empty(*shape, dtype=dt)
            def run(a=a, kind=kind):
                b = a if kind != 1 else None
                c = a if kind in (0, 3) else None
                e = a if kind == 3 else None
                base = torch.empty(a.shape[0], dtype=a.dtype)
                K.code_nll_fwd(a, b, c, e, None, kind)
                K.code_nll_fwd(a, b, c, e, base, kind)
                K.code_nll_bwd(torch.empty(a.shape[0], dtype=a.dtype), a, b, c, e, kind, True, True, True, True)
            jobs.append((f"code_nll {dt} {tuple(a.shape)} kind={kind}", run))

        for rows, d, k in vamp:
            z = torch.empty(rows, d, dtype=dt)
            mu = torch.empty(k, d, dtype=dt)

            def run(z=z, mu=mu):
                _, lse = K.vamp_fwd(z, mu, mu, None)
                K.vamp_fwd(z, mu, mu, torch.empty(z.shape[0], dtype=z.dtype))
                K.vamp_bwd(torch.empty(z.shape[0], dtype=z.dtype), z, mu, mu, lse, True, True, True)
                K.vamp_bwd(torch.empty(z.shape[0], dtype=z.dtype), z, mu, mu, lse, False, True, False)
            jobs.append((f"vamp {dt} z={tuple(z.shape)} K={k}", run))

        # bias_act: channels-last (inner == 1, specialised) and contiguous NCHW, 2-D, all sizes 1;
        # the bf16 one past 2**31 elements exercises the int64 block starts (never touched)
        ba_cases = ([((256, 128, 16, 16), True), ((256, 3, 64, 64), False), ((256, 512), False),
                     ((1, 1, 1, 1), False)] if not quick else [((4, 8, 3, 3), True), ((2, 3, 5, 5), False)])
        if dt == torch.bfloat16 and not quick:
            ba_cases.append(((2**16, 2**15 + 1), False))
        for shape, channels_last in ba_cases:
            x = torch.empty(shape, dtype=dt)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            bias = torch.empty(shape[1], dtype=acc_dtype(dt))
            for act in BIAS_ACTIVATIONS:
                def run_bias_act(x=x, bias=bias, act=act):
                    K.bias_act_fwd(x, bias, act, 0.2)
                    K.bias_act_fwd(x, None, act, 0.2)
                    K.bias_act_bwd(x, x, act, 0.2)
                jobs.append((f"bias_act {dt} {tuple(x.shape)} cl={channels_last} {act}", run_bias_act))

        shapes = [(3, 5), (70000,), (1,)] if not quick else [(3, 5)]
        params = [torch.empty(s, dtype=dt) for s in shapes]
        st = acc_dtype(dt)
        state = [torch.empty(s, dtype=st) for s in shapes]

        steps = [torch.empty((), dtype=torch.float32) for _ in shapes]
        flag = torch.empty(1, dtype=torch.float32)

        def run_optim(params=params, state=state, steps=steps, flag=flag):
            for cv in (False, True):
                ref = params if cv else []
                anc = state if cv else []
                for dirs in ([], state):
                    for wd, dec in ((0.0, False), (0.1, False), (0.1, True)):
                        for counts, found in (([], None), (steps, flag)):  # host step / device step and skip
                            K.cv_adam_(params, params, ref, anc, state, state, dirs, 1.0, 3, 1e-3, 0.9, 0.999, 1e-8,
                                       wd, dec, counts, found)
                    for mom, nest, first in ((0.0, False, False), (0.9, False, True), (0.9, True, False)):
                        for found in (None, flag):
                            K.cv_sgd_(params, params, ref, anc, state if mom else [], dirs, 1.0, 0.1, mom, 0.0, 0.01,
                                      nest, first, found)
        jobs.append((f"optim {dt}", run_optim))

    # batch norm + activation: the DCGAN layers at batch 256 (bf16 channels_last on the GPU) and odd
    # sizes, both layouts, each activation, with and without affine parameters; forward, backward
    # with batch statistics and with running ones
    def bn_job(x, act, affine):
        vec = torch.empty(x.shape[1], dtype=acc_dtype(x.dtype))
        p = vec if affine else None

        def run():
            mean, m2 = K.bn_stats(x)
            K.bn_act_fwd(x, mean, m2, p, p, vec, act, 0.2)
            sums = K.bn_act_bwd_sums(x, x, mean, m2, p, p, vec, act, 0.2)
            K.bn_act_bwd_dx(x, x, mean, m2, p, p, vec, sums[:2], act, 0.2)
            K.bn_act_bwd_dx(x, x, mean, m2, p, p, None, None, act, 0.2)
        return f"batch_norm {x.dtype} {tuple(x.shape)} cl={not x.is_contiguous()} act={act} affine={affine}", run

    bn_shapes = [(256, 512, 4, 4), (256, 256, 8, 8), (256, 128, 16, 16), (256, 128, 32, 32), (256, 64, 32, 32),
                 (3, 5, 7, 7), (2, 3, 1, 1)] if not quick else [(4, 8, 4, 4), (3, 5, 1, 1)]
    bn_x = [torch.empty(n, h, w, c, dtype=dt).permute(0, 3, 1, 2) if cl else torch.empty(n, c, h, w, dtype=dt)
            for (n, c, h, w), dt, cl in itertools.product(bn_shapes, dtypes, (True, False))]
    if not quick:  # 2**31 elements: int64 offsets (never touched)
        bn_x.append(torch.empty(16384, 32, 32, 128, dtype=torch.bfloat16).permute(0, 3, 1, 2))
    for x in bn_x:
        for act, affine in ((0, True), (1, True), (2, True), (2, False)):
            jobs.append(bn_job(x, act, affine))

    # the MALA step of AIS (ehm_fast.sampling): a chain's first, middle and last step; D = 1, one
    # block, several blocks (a 64x64 RGB image) at 256 chains
    from ehm_fast.kernels.sampling import mala_step

    def mala_job(m, d, dt):
        a, v = torch.empty(m, d, dtype=dt), torch.empty(m, dtype=dt)

        def run():
            for pending, noise in ((False, a), (True, a), (True, None)):
                p = (a, a, a, v, v, v) if pending else (None,) * 6
                mala_step(a, a, a, v, v, v, v, v, *p, noise, 0.25, 0.5, 0.1, 0.57)
        return f"mala_step {dt} {m}x{d}", run

    mala_sizes = [(256, 3 * 64 * 64), (64, 100), (3, 1)] if not quick else [(4, 3000), (3, 1)]
    jobs += [mala_job(m, d, dt) for m, d in mala_sizes for dt in (torch.float32, torch.float64)]

    # convolution (4x4/2/1, channels_last): each GPU tile on the DCGAN layers at batch 256 (bf16),
    # the layer path's plain calls and every epilogue; fp32/fp64 (tests) with their one tile
    from ehm_fast.kernels.conv import GPU_TILES, WIDE_TILE

    def conv_job(n, c, o, size, dt, tile):
        x = torch.empty(n, size, size, c, dtype=dt).permute(0, 3, 1, 2)
        w = torch.empty(o, 4, 4, c, dtype=dt).permute(0, 3, 1, 2)
        y = torch.empty(n, size // 2, size // 2, o, dtype=dt).permute(0, 3, 1, 2)
        b = torch.empty(o, dtype=dt)

        def run():
            for bias, act, stats in ((None, "linear", False), (b, "lrelu", True)):
                if stats and tile.block_n >= 256:  # never chosen with the statistics epilogue (it spills)
                    continue
                K.conv_fwd(x, w, bias, 2, 1, act, 0.2, stats, tile=tile)
                K.conv_dgrad(x, w.transpose(0, 1), bias, 2, 1, (2 * size, 2 * size), act, 0.2, stats, tile=tile)
            for split in (1, 8):
                K.conv_wgrad(y, x, w, 2, 1, tile=tile, split=split)
        return f"conv {dt} {n}x{c}x{size}x{size} -> {o} {tile}", run

    conv_layers = [(256, 64, 128, 32), (256, 128, 256, 16), (256, 256, 512, 8)] if not quick else [(256, 64, 128, 32)]
    jobs += [conv_job(*layer, torch.bfloat16, t) for layer in conv_layers for t in GPU_TILES]
    jobs += [conv_job(4, 3, 16, 8, dt, WIDE_TILE) for dt in (torch.float32, torch.float64)]
    return jobs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (fewer specialisations)")
    args = ap.parse_args()
    comp = Compiler(args.arch)
    original = JITFunction.__getitem__
    JITFunction.__getitem__ = lambda fn, grid: (lambda *a, **kw: comp.launch(fn, grid, a, kw))
    wrapper_errors = []
    try:
        for label, job in _workloads(args.quick):
            try:
                job()
            except Exception as exc:
                wrapper_errors.append(f"{label}: {type(exc).__name__}: {exc}")
    finally:
        JITFunction.__getitem__ = original
    failed = 0
    for res in comp.results.values():
        status = "ok  " if res.ok else "FAIL"
        failed += not res.ok
        print(f"{status} {res.name:22s} regs={res.regs:3d} smem={res.shared:6d} {res.spill:24s} grid={res.grid} "
              f"{res.key} {' '.join(res.notes)}")
        if res.error:
            print("     " + res.error.replace("\n", "\n     "))
    for err in wrapper_errors:
        print("WRAPPER ERROR", err)
    print(f"{len(comp.results)} specialisations, {failed} failed, {len(wrapper_errors)} wrapper errors")
    return 1 if failed or wrapper_errors else 0


if __name__ == "__main__":
    sys.exit(main())
