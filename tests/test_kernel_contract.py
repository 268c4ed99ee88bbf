"""The contract between the ops and their kernels: ehm_fast._C (C++/CUDA) and ehm_fast.kernels
(Triton) export the same functions with the same arguments, and agree on the constants.

`ehm_fast._backend.kernels_for` hands either module to an op, which calls `<module>.<name>(...)`
positionally: a renamed, reordered or missing argument on one side would only show when that
backend runs. _C's signatures come from its pybind11 docstrings, the Triton ones from
inspect.signature; the constants from csrc/terms.h and ehm_fast.ops.contract.
"""

import inspect
import re
from pathlib import Path

import pytest
import torch

from ehm_fast import _backend
from ehm_fast.ops import contract

ROOT = Path(__file__).resolve().parents[1]
# _C's own helpers, not kernels
C_ONLY = {"with_cuda", "torch_version"}
# the layer kernels of ehm_fast.nn have Triton forms and plain-PyTorch references, no C++/CUDA ones
TRITON_ONLY = {"bias_act_fwd", "bias_act_bwd", "bn_stats", "bn_act_fwd", "bn_act_bwd_sums", "bn_act_bwd_dx", "conv_fwd",
               "conv_dgrad", "conv_wgrad"}

# annotation -> kind, for each side's spelling (a new spelling fails the test: add it here)
_C_KINDS = {
    "torch.Tensor": "Tensor",
    "torch.Tensor | None": "Tensor?",
    "collections.abc.Sequence[torch.Tensor]": "Tensor[]",
    "list[torch.Tensor]": "Tensor[]",
    "typing.SupportsInt | typing.SupportsIndex": "int",
    "typing.SupportsFloat | typing.SupportsIndex": "float",
    "bool": "bool",
    "int": "int",
    "None": "None",
}
_TRITON_KINDS = {
    "torch.Tensor": "Tensor",
    "torch.Tensor | None": "Tensor?",
    "Tensors": "Tensor[]",
    "tuple[torch.Tensor, torch.Tensor]": "Tensor[]",
    "tuple[torch.Tensor, torch.Tensor, torch.Tensor]": "Tensor[]",
    "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]": "Tensor[]",
    "bool": "bool",
    "int": "int",
    "float": "float",
    "None": "None",
}


def _compiled():
    if not _backend.cpu_built():
        pytest.skip("ehm_fast._C is not built")
    return _backend.compiled()


def _kernels():
    pytest.importorskip("triton")
    import ehm_fast.kernels

    return ehm_fast.kernels


def _split_top_level(text: str) -> list[str]:
    """`a: x[b, c], d: y` -> ["a: x[b, c]", "d: y"]: commas outside brackets only."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    tail = text[start:].strip()
    return parts + [tail] if tail else parts


def _kind(table: dict[str, str], annotation: str, where: str) -> str:
    assert annotation in table, f"{where}: unknown annotation {annotation!r} (add it to this test's kind tables)"
    return table[annotation]


def c_signature(fn) -> tuple[list[tuple[str, str]], str]:
    """([(argument, kind)], return kind) from the first line of a pybind11 docstring."""
    line = fn.__doc__.splitlines()[0]
    m = re.fullmatch(rf"{fn.__name__}\((.*)\) -> (.+)", line)
    assert m, f"unexpected pybind11 signature line: {line!r}"
    args = []
    for part in _split_top_level(m.group(1)):
        name, annotation = part.split(": ", 1)
        assert " = " not in annotation, f"_C.{fn.__name__}({name}) has a default; the kernels take none"
        args.append((name, _kind(_C_KINDS, annotation, f"_C.{fn.__name__}({name})")))
    return args, _kind(_C_KINDS, m.group(2), f"_C.{fn.__name__} return")


def triton_signature(fn) -> tuple[list[tuple[str, str]], str]:
    sig = inspect.signature(fn)
    args = []
    for p in sig.parameters.values():
        where = f"kernels.{fn.__name__}({p.name})"
        assert p.annotation is not inspect.Parameter.empty, f"{where} has no annotation"
        assert p.default is inspect.Parameter.empty, f"{where} has a default; _C takes none"
        args.append((p.name, _kind(_TRITON_KINDS, p.annotation, where)))
    return args, _kind(_TRITON_KINDS, sig.return_annotation, f"kernels.{fn.__name__} return")


def _c_ops(c_module) -> set[str]:
    return {n for n in dir(c_module) if not n.startswith("_") and callable(getattr(c_module, n))} - C_ONLY


def test_both_backends_export_the_same_ops():
    c_ops, triton_ops = _c_ops(_compiled()), set(_kernels().__all__)
    assert TRITON_ONLY <= triton_ops, f"listed as Triton-only but not exported: {TRITON_ONLY - triton_ops}"
    assert not c_ops & TRITON_ONLY, f"now in _C too: drop from TRITON_ONLY {c_ops & TRITON_ONLY}"
    assert c_ops - triton_ops == set(), "in _C but not in ehm_fast.kernels"
    assert triton_ops - TRITON_ONLY - c_ops == set(), "in ehm_fast.kernels but not in _C (or list it in TRITON_ONLY)"


@pytest.mark.parametrize("name", sorted(_c_ops(_backend.compiled()) if _backend.cpu_built() else []))
def test_same_arguments_in_the_same_order(name):
    c_module, kernels = _compiled(), _kernels()
    c_args, c_ret = c_signature(getattr(c_module, name))
    t_args, t_ret = triton_signature(getattr(kernels, name))
    assert [a for a, _ in t_args] == [a for a, _ in c_args], "argument names or order differ"
    assert t_args == c_args, "argument kinds differ (tensor / optional tensor / tensor list / bool / int / float)"
    assert t_ret == c_ret, "return kinds differ"


def test_signature_parsers_read_what_they_should():
    c_args, c_ret = c_signature(_compiled().code_nll_fwd)
    assert c_args[:2] == [("a", "Tensor"), ("b", "Tensor?")] and c_args[-1] == ("kind", "int") and c_ret == "Tensor"
    t_args, t_ret = triton_signature(_kernels().cv_sgd_)
    assert t_args[0] == ("params", "Tensor[]") and ("lr", "float") in t_args and t_ret == "None"


def _cpp_enum(text: str, name: str) -> dict[str, int]:
    """{UPPER_SNAKE: value} of `enum class name : int { ... };` (comments ignored)."""
    m = re.search(rf"enum class {name} : int \{{(.*?)\}};", text, re.S)
    assert m, f"enum class {name} not found in csrc/terms.h"
    body = re.sub(r"//[^\n]*", "", m.group(1))
    items = dict(re.findall(r"(\w+)\s*=\s*(\d+)", body))
    return {re.sub(r"(?<!^)(?=[A-Z])", "_", k).upper(): int(v) for k, v in items.items()}


def test_likelihood_kinds_agree_between_python_and_cpp():
    terms = (ROOT / "csrc" / "terms.h").read_text()
    image, code = _cpp_enum(terms, "ImageKind"), _cpp_enum(terms, "CodeKind")
    assert image == {k: getattr(contract, k) for k in ("GAUSSIAN", "LAPLACE", "BERNOULLI")}
    assert code == {k: getattr(contract, k) for k in ("LATENT", "STD_NORMAL", "KL_STD", "KL_PAIR")}
    python = {k for k, v in vars(contract).items() if k.isupper() and isinstance(v, int)}
    assert python == set(image) | set(code), "a kind defined on one side only"


def test_triton_kinds_are_the_contract_constants():
    from ehm_fast.kernels import likelihood

    for name in ("GAUSSIAN", "LAPLACE", "BERNOULLI", "LATENT", "STD_NORMAL", "KL_STD", "KL_PAIR"):
        assert getattr(likelihood, name).value == getattr(contract, name), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_accumulation_dtype_agrees_between_backends(dtype):
    """The statistics each backend returns are in contract.acc_dtype (C++: acc_type_of)."""
    s, x = torch.randn(2, 5).to(dtype), torch.randn(2, 6).to(dtype)
    scale = torch.zeros(6, dtype=contract.acc_dtype(dtype))
    for module in (_compiled(), _kernels()):
        _, lse = module.log_partition_fwd(s, None, False)
        nll = module.image_nll_fwd(x, x, scale, contract.GAUSSIAN)
        assert lse.dtype == nll.dtype == contract.acc_dtype(dtype), module.__name__


def test_the_kernels_package_is_the_top_level_folder():
    """kernels/ installs as ehm_fast.kernels with each file under one name (no link inside ehm_fast/)."""
    import ehm_fast
    import ehm_fast.kernels

    root = Path(ehm_fast.__file__).resolve().parents[1]
    assert not (root / "ehm_fast" / "kernels").exists()
    assert Path(ehm_fast.kernels.__file__).resolve() == root / "kernels" / "__init__.py"


def test_the_accumulation_dtype_rule_is_defined_once():
    """Everyone asks ehm_fast.ops.contract.acc_dtype (Triton code: kernels/_dtypes.tl_acc)."""
    root = Path(__file__).resolve().parents[1]
    rule = re.compile(r"float64 if .+ else (torch|tl)\.float32")
    copies = [f"{path.relative_to(root)}:{i}" for folder in ("ehm_fast", "kernels", "scripts", "benchmarks")
              for path in sorted((root / folder).rglob("*.py"))
              for i, line in enumerate(path.read_text().splitlines(), 1) if rule.search(line)]
    assert len(copies) == 1 and copies[0].startswith("ehm_fast/ops/contract.py:"), copies
