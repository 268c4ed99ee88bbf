"""README.md's commands and Python examples, run or parsed, so that the README stays true.

Every command line of the README's ```bash blocks is one test, in README order, in one shared
working folder (relative paths such as runs/digits resolve there; absolute placeholders such as
/data/... and /path/to/... are re-rooted under it). What each kind gets:

  ran     ehm-train, ehm-sample, ehm-prepare (in-process `main(argv)`, tiny sizes appended: argparse
          keeps the last value of a flag); ehm-fid too, with a stand-in for the Inception network
          (its weights cannot be downloaded here)
  parsed  torchrun (torch's own parser, then ehm-train's parser for the script's flags), python -m
          pytest (the test files exist), python benchmarks/*.py and scripts/*.py (the script's own
          parser accepts the flags; they run in tests/test_benchmarks.py and friends), bash scripts
          (the file exists and `bash -n` accepts it)

A command of any other kind fails the test, so a new command cannot slip through unchecked. Each
```python block is executed (with tiny sizes substituted), and the first ```yaml block is the
config file `my.yaml` of the README's `--config` example.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Appended to every ehm-train run (argparse keeps the last occurrence of a flag).
TINY_TRAIN = ["--steps", "2", "--width", "4", "--critic-width", "4", "--z-dim", "4", "--batch-size", "8",
              "--n-critic", "1", "--log-every", "1", "--sample-every", "100", "--ckpt-every", "100",
              "--n-samples", "4", "--device", "cpu", "--vamp-components", "2"]
TINY_RESUME = ["--steps", "3", "--log-every", "1", "--sample-every", "100", "--device", "cpu"]
# Substitutions in the Python blocks: README sizes -> tiny ones.
TINY_PYTHON = [("range(1000)", "range(2)"), ("width=32", "width=4"), ("z_dim=32", "z_dim=4"),
               ("batch_size=64", "batch_size=8")]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, re.DOTALL | re.MULTILINE)


def _commands() -> list[str]:
    out = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(shlex.join(words))
    return out


COMMANDS = _commands()


class _Parsed(Exception):
    """Raised by the patched parse_args: the flags were accepted, nothing ran."""


def _parse_only(monkeypatch) -> None:
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)


class TinyFeatures(torch.nn.Module):
    """Stands in for Inception: uint8 [B, 3, H, W] -> [B, 16]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)
        return torch.cat([x, x.square()], 1)[:, :16] if x.shape[1] >= 8 else x.repeat(1, 16)[:, :16]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The shared folder, with the data the README's placeholders name; digits decoded once."""
    from PIL import Image

    from ehm_fast.data import digits
    from ehm_fast.data.synthetic import make_lsun

    ws = tmp_path_factory.mktemp("readme")
    images = ws / "path/to/images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    (ws / "data/lsun").mkdir(parents=True)
    make_lsun(ws / "data/lsun/bedroom_train_lmdb", 12, seed=1, short_side=72)
    (ws / "my.yaml").write_text(_blocks("yaml")[0])
    mp = pytest.MonkeyPatch()
    mp.setattr(digits, "Digits", functools.lru_cache(maxsize=4)(digits.Digits))  # read-only after construction
    yield ws
    mp.undo()


def _reroot(words: list[str], ws: Path) -> list[str]:
    out = []
    for w in words:
        for prefix in ("/data/", "/path/to/"):
            w = re.sub(rf"(^|:){re.escape(prefix)}", lambda m, p=prefix: m.group(1) + str(ws) + p, w)
        out.append(w)
    return out


def _value(words: list[str], flag: str) -> str | None:
    return words[words.index(flag) + 1] if flag in words else None


def _ensure_run(ws: Path, run: str) -> None:
    """A command that reads runs/X (ehm-sample, ehm-fid, --resume) finds one, also when run alone."""
    from ehm_fast import train

    if (ws / run / "checkpoint.pt").exists():
        return
    extra = ["--data", f"shards:{ws}/data/bedroom64", "--image-size", "64"] if "bedroom" in run else []
    if extra:
        _ensure_shards(ws)
    assert train.main(extra + TINY_TRAIN + ["--out", str(ws / run)]) == 0


def _ensure_shards(ws: Path) -> None:
    prepare = importlib.import_module("ehm_fast.data.prepare")

    if not (ws / "data/bedroom64/index.json").exists():
        assert prepare.main(["--source", f"lsun:{ws}/data/lsun/bedroom_train_lmdb", "--out",
                             str(ws / "data/bedroom64"), "--size", "64", "--workers", "1", "--quiet"]) == 0


def _ehm_train(words, ws, monkeypatch):
    from ehm_fast import train

    if words == ["--help"]:
        with pytest.raises(SystemExit) as exc:
            train.main(words)
        assert exc.value.code == 0
        return "ran"
    resume = _value(words, "--resume")
    data = _value(words, "--data") or ""
    if data.startswith("shards:"):
        _ensure_shards(ws)
    if resume:
        _ensure_run(ws, resume)
        assert train.main(words + TINY_RESUME) == 0
        return "ran"
    out = _value(words, "--out")
    if out and (ws / out / "checkpoint.pt").exists():  # rerun in the same folder: start afresh
        import shutil

        shutil.rmtree(ws / out)
    assert train.main(words + TINY_TRAIN) == 0
    return "ran"


def _ehm_sample(words, ws, monkeypatch):
    from ehm_fast import sample

    _ensure_run(ws, _value(words, "--checkpoint"))
    tiny = ["--n", "8"] + (["--refine-steps", "2"] if "--refine" in words else [])
    assert sample.main(words + tiny) == 0
    out = Path(_value(words, "--out") or "samples.png")
    assert out.exists()
    if "--reconstruct" in words:
        assert out.with_name(out.stem + "_recon.png").exists()
    if "--refine-compare" in words:
        assert out.with_name(out.stem + "_refine.png").exists()
    return "ran"


def _ehm_prepare(words, ws, monkeypatch):
    prepare = importlib.import_module("ehm_fast.data.prepare")

    assert prepare.main(words + ["--workers", "1", "--quiet"]) == 0
    assert (Path(_value(words, "--out")) / "index.json").exists()
    return "ran"


def _ehm_fid(words, ws, monkeypatch, capsys):
    from ehm_fast import fid

    _ensure_run(ws, _value(words, "--checkpoint"))
    if (_value(words, "--data") or "").startswith("shards:"):
        _ensure_shards(ws)
    monkeypatch.setattr(fid, "inception", lambda feature=2048, weights_path=None: TinyFeatures())
    capsys.readouterr()
    assert fid.main(words + ["--num-images", "8", "--device", "cpu", "--batch-size", "4"]) == 0
    assert capsys.readouterr().out.startswith("FID ")
    return "ran (stand-in feature extractor)"


def _torchrun(words, ws, monkeypatch):
    from torch.distributed.run import get_args_parser

    from ehm_fast import train

    args = get_args_parser().parse_args(words)
    assert args.module and args.training_script == "ehm_fast.train", words
    train.build_parser().parse_args(args.training_script_args)
    return "parsed"


def _python(words, ws, monkeypatch):
    if words[:2] == ["-m", "pytest"]:
        paths = [w for w in words[2:] if not w.startswith("-") and (w.startswith("tests") or w.endswith(".py"))]
        assert paths and all((ROOT / p).exists() for p in paths), paths
        return "parsed"
    if words[:2] == ["-m", "ehm_fast.train"]:
        return _ehm_train(words[2:], ws, monkeypatch)
    script = ROOT / words[0]
    assert script.suffix == ".py" and script.exists(), words[0]
    assert script.parent.name in ("benchmarks", "scripts"), words[0]
    if script.parent.name == "scripts":
        # build and diagnostic tools set up triton for themselves at import (the compile check
        # unsets TRITON_INTERPRET before triton starts): their own process, flags checked by argparse
        parser = subprocess.run([sys.executable, str(script), *words[1:], "--help"], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert parser.returncode == 0 and "usage:" in parser.stdout, parser.stderr[-2000:]
        return "parsed"
    _parse_only(monkeypatch)
    monkeypatch.setattr(sys, "argv", [str(script)] + words[1:])
    monkeypatch.syspath_prepend(str(ROOT))
    module = runpy.run_path(str(script), run_name="readme_check")
    main = module["main"]
    takes_argv = bool(inspect.signature(main).parameters)  # else main() reads sys.argv
    with pytest.raises(_Parsed):
        main(words[1:]) if takes_argv else main()
    return "parsed"


def _bash(words, ws, monkeypatch):
    script = ROOT / words[0]
    assert script.exists(), words[0]
    subprocess.run(["bash", "-n", str(script)], check=True)
    return "parsed"


def _split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        k, v = words[0].split("=", 1)
        env[k] = v
        words = words[1:]
    return env, words


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{i:02d} {c[:60]}" for i, c in enumerate(COMMANDS)])
def test_readme_command(command, work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    env, words = _split_env(shlex.split(command))
    assert set(env) <= {"EHM_FAST_CUDA", "EHM_FAST_REBUILD", "EHM_TEST_SEED", "STEPS"}, env
    words = _reroot(words, work)
    prog, rest = words[0], words[1:]
    handlers = {"ehm-train": _ehm_train, "ehm-sample": _ehm_sample, "ehm-prepare": _ehm_prepare,
                "torchrun": _torchrun, "python": _python, "bash": _bash}
    if prog == "ehm-fid":
        how = _ehm_fid(rest, work, monkeypatch, capsys)
    elif prog in handlers:
        how = handlers[prog](rest, work, monkeypatch)
    else:
        pytest.fail(f"README command of an unchecked kind: {command}")
    print(f"{how}: {command}")


def test_every_cli_of_the_package_appears_in_the_readme():
    for prog in ("ehm-train", "ehm-sample", "ehm-prepare", "ehm-fid"):
        assert any(c.startswith(prog) for c in COMMANDS), prog


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_block(index, work, monkeypatch):
    monkeypatch.chdir(work)
    code = _blocks("python")[index]
    for old, new in TINY_PYTHON:
        code = code.replace(old, new)
    if "runs/digits" in code:
        _ensure_run(work, "runs/digits")
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme_block"})  # noqa: S102 - the README's own examples
