"""Which of ehm_fast.nn's exact layer speedups are in force (a leaf module: the config reads it)."""

from __future__ import annotations

IMAGE_LAYERS = ("cudnn", "matmul")
# the kernels of ehm_fast.nn.conv's convolutions (LayerOptions.conv_kernel). Not a lever: "all"
# must not switch to Triton before a GPU measurement shows it faster than cuDNN
CONV_KERNELS = ("cudnn", "triton")
LEVERS = ("conv", "bn_act", "bias_act", "weight_cache", "merge")
# levers that "all" and "auto" leave off until a GPU run measures them: named explicitly, alone or
# after "all" ("all,explicit_penalty")
OPT_IN_LEVERS = ("explicit_penalty",)
LEVER_HELP = {
    "conv": "convolutions whose backward never recomputes through the saved input (no zero path in the "
            "penalty's double backward)",
    "bn_act": "batch norm + activation as one fused op (Triton on a GPU)",
    "bias_act": "bias + activation as one fused op with an exactly-zero mask derivative",
    "weight_cache": "bf16 copies of the weights made once per optimizer step, not at every use",
    "merge": "one convolution where two read the same input (the encoder's mean and log-variance heads)",
    "explicit_penalty": "the gradient penalty's parameter gradient by hand-written first-order passes (no double "
                        "backward, so torch.compile can trace the critic step; not in all: name it)",
}


def levers_for(text: str | tuple[str, ...] | frozenset[str], device_type: str) -> frozenset[str]:
    """`parse_levers`, with "auto" = all on a GPU and none on the CPU, where the fused ops run as
    their references and the CPU's transposed convolutions are slower than its convolution backward."""
    if text == "auto":
        return frozenset(LEVERS) if device_type == "cuda" else frozenset()
    return parse_levers(text)


def parse_levers(text: str | tuple[str, ...] | frozenset[str]) -> frozenset[str]:
    """"all", "none", or a comma-separated list of LEVERS and OPT_IN_LEVERS (a "-name" entry removes
    one from all; "all,name" adds opt-in ones to all)."""
    if not isinstance(text, str):
        items = [str(t) for t in text]
    else:
        items = [t.strip() for t in text.split(",") if t.strip()]
    if items[:1] == ["all"]:
        for t in items[1:]:
            if t not in OPT_IN_LEVERS:
                raise ValueError(f"only opt-in levers {OPT_IN_LEVERS} may follow all, got {t!r}")
        return frozenset(LEVERS) | frozenset(items[1:])
    if items in ([], ["none"]):
        return frozenset()
    if all(t.startswith("-") for t in items):
        chosen = set(LEVERS)
        for t in items:
            _check(t[1:])
            chosen.discard(t[1:])
        return frozenset(chosen)
    for t in items:
        _check(t)
    return frozenset(items)


def _check(name: str) -> None:
    if name not in LEVERS + OPT_IN_LEVERS:
        raise ValueError(f"layer lever must be one of {LEVERS + OPT_IN_LEVERS} (or all / none / -name), got {name!r}")
