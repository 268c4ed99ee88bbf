"""benchmarks/refine_digits.py and benchmarks/ais_study.py run end to end at tiny sizes and write
their results files (into a temporary folder here)."""

import json

import pytest

from benchmarks import ais_study, harness, refine_digits

TINY = ["--width", "4", "--critic-width", "4", "--z-dim", "4", "--batch-size", "8", "--n-critic", "1",
        "--ckpt-every", "100", "--n-samples", "4", "--device", "cpu"]


@pytest.fixture
def results(tmp_path, monkeypatch):
    """Results into a temporary folder, and a classifier fitted in a fraction of the real one's time
    (the scoring functions themselves are quality_digits' own)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    def quick_classifier():
        d = load_digits()
        return LogisticRegression(max_iter=50).fit(d.data / 16.0, d.target)

    folder = tmp_path / "results"
    monkeypatch.setattr(harness, "RESULTS", folder)
    for script in (refine_digits, ais_study):
        monkeypatch.setattr(script, "fit_classifier", quick_classifier)
    return folder


def written(folder, stem):
    (path,) = folder.glob(f"{stem}_*.json")
    assert (path.with_suffix(".md")).read_text().startswith(f"# {stem} on ")
    return json.loads(path.read_text())["rows"]


def test_refine_digits_tiny(tmp_path, results):
    code = refine_digits.main(["--seeds", "2", "--steps", "1", "--n", "12", "--refine-steps", "0", "2",
                               "--work", str(tmp_path / "runs"), "--", *TINY])
    assert code == 0
    rows = written(results, "refine_digits")
    assert sorted((r["seed"], r["refine_steps"]) for r in rows) == [(0, 0), (0, 2), (1, 0), (1, 2)]
    assert all(0 <= r["confident"] <= 1 and 0 <= r["entropy"] <= 3.33 for r in rows)


def test_ais_study_tiny(tmp_path, results):
    code = ais_study.main(["--seeds", "1", "--steps", "1", "--m", "6", "--repeats", "2", "--ais-steps", "2",
                           "--work", str(tmp_path / "runs"), "--", *TINY])
    assert code == 0
    (rows,) = written(results, "ais_study")
    assert sorted({r["estimator"] for r in rows["weights"]}) == ["ais K=1", "ais K=16", "ais K=4", "importance"]
    assert all(1 <= r["ess"] <= 6 for r in rows["weights"])
    assert {r["estimator"] for r in rows["quality"]} == {"jensen", "importance", "ais"}
    assert len(rows["cost"]) == 4 and all(r["us"] > 0 for r in rows["cost"])
