"""Small utilities shared by the tests."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max(|e|, tiny) over finite entries, in float64."""
    a, e = actual.double(), expected.double()
    scale = e.abs().max().clamp_min(1e-30)
    return ((a - e).abs().max() / scale).item()


@contextlib.contextmanager
def poisoned_memory(*shapes: tuple[int, ...], dtype: torch.dtype, device: str) -> Iterator[None]:
    """Fill blocks of the sizes the op is about to allocate with NaN and free them, so the
    allocator hands the op poisoned memory (reliable with the CUDA caching allocator,
    opportunistic on the CPU): an element the kernel forgets to write then shows as NaN."""
    blocks = [torch.full(s, float("nan"), dtype=dtype, device=device) for s in shapes]
    del blocks
    yield


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    same_nonfinite = torch.equal(torch.isfinite(actual), torch.isfinite(expected.to(actual.dtype)))
    assert same_nonfinite, f"{what}: non-finite entries differ"
    finite = torch.isfinite(expected)
    if finite.any():
        err = rel_err(actual[finite], expected[finite])
        assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def aot_graph_capture() -> tuple[list[str], Callable]:
    """(graphs, backend): a torch.compile backend that keeps the text of every forward and backward
    graph aot_autograd makes (to check which ops a compiled function reaches), then runs them."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs: list[str] = []

    def capture(gm: Any, example_inputs: Any) -> Any:
        def keep(graph_module: Any, _: Any) -> Any:
            graphs.append(str(graph_module.graph))
            return make_boxed_func(graph_module)
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep)

    return graphs, capture


def run_cli(fn: Callable[[list[str]], int], args: list[str], capsys: Any) -> tuple[int, str]:
    """A CLI's exit code (argparse's SystemExit included) and what it wrote to stderr."""
    try:
        code = fn(args)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    return code, capsys.readouterr().err
