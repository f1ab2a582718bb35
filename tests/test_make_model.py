"""train/make_model.sh's routing, with a stand-in mushcam-train that logs its arguments (no TensorFlow)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FAKE = """#!/usr/bin/env bash
# Logs each call and leaves the files the script copies afterwards.
echo "$*" >> "$LOG"
if [ "$1" = evaluate ]; then mkdir -p "$3/report"; touch "$3/report/risk_coverage.png" "$3/report/risk_coverage.csv"; fi
if [ "$1" = export ]; then
  mkdir -p "$2/openworld"
  for f in compare.png compare.csv compare.md loso_risk_coverage.png loso_risk_coverage.csv; do touch "$2/openworld/$f"; done
fi
"""


def run_script(tmp_path: Path, with_folds: bool, folds_file: bool = False) -> tuple[subprocess.CompletedProcess, list[str]]:
    shared, work, model, docs = tmp_path / "shared", tmp_path / "work", tmp_path / "models" / "m", tmp_path / "docs"
    for f in ("data/mushrooms/edibility.csv", "data/fungi-other/species.csv",
              "weights/mobilenet_v2_1.0_224_no_top.weights.h5"):
        (shared / f).parent.mkdir(parents=True, exist_ok=True)
        (shared / f).write_text("x")
    if with_folds:
        (tmp_path / "work-loso" / "without-x").mkdir(parents=True)
        (tmp_path / "work-loso" / "without-x" / "loso.json").write_text("{}")
    if folds_file:
        (tmp_path / "train").mkdir()
        (tmp_path / "train" / "shared-pool-folds.json").write_text("{}")
    fake = tmp_path / ".venv" / "bin" / "mushcam-train"
    fake.parent.mkdir(parents=True)
    fake.write_text(FAKE)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "LOG": str(log), "DOCS": str(docs)}
    env.pop("LOSO", None)
    env.pop("FOLDS", None)
    result = subprocess.run(["bash", str(REPO / "train" / "make_model.sh"), str(shared), str(work), str(model)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    return result, log.read_text().splitlines() if log.exists() else []


def test_without_folds_the_val_only_bundle_never_replaces_the_model_or_the_docs(tmp_path):
    result, calls = run_script(tmp_path, with_folds=False)
    assert result.returncode == 0, result.stderr
    assert [c.split()[0] for c in calls] == ["prepare", "fit", "export", "evaluate"]
    export, evaluate = calls[2].split(), calls[3].split()
    assert export[export.index("--out") + 1] == str(tmp_path / "work" / "bundle") and "--loso" not in export
    assert evaluate[1] == str(tmp_path / "work" / "bundle")
    assert "val species only" in result.stderr and "left as it is" in result.stderr
    assert not (tmp_path / "docs").exists()


def test_with_folds_the_model_is_exported_with_them_the_docs_follow_and_their_evidence_is_kept(tmp_path):
    result, calls = run_script(tmp_path, with_folds=True)
    assert result.returncode == 0, result.stderr
    assert [c.split()[0] for c in calls] == ["prepare", "fit", "export", "evaluate", "folds"]
    export, evaluate, folds = calls[2].split(), calls[3].split(), calls[4].split()
    assert export[export.index("--out") + 1] == str(tmp_path / "models" / "m")
    assert export[export.index("--loso") + 1] == str(tmp_path / "work-loso")
    assert evaluate[1] == str(tmp_path / "models" / "m")
    assert (tmp_path / "docs" / "figures" / "loso_risk_coverage.png").exists()
    # The folds' evidence goes to the file the next `make model` (a machine without the folds) reads.
    assert folds[1:] == [str(tmp_path / "work-loso"), str(tmp_path / "work"), "--out", "train/shared-pool-folds.json"]


def test_without_the_folds_folder_the_evidence_file_calibrates_the_model(tmp_path):
    result, calls = run_script(tmp_path, with_folds=False, folds_file=True)
    assert result.returncode == 0, result.stderr
    assert [c.split()[0] for c in calls] == ["prepare", "fit", "export", "evaluate"]
    export = calls[2].split()
    assert export[export.index("--out") + 1] == str(tmp_path / "models" / "m")
    assert export[export.index("--loso") + 1] == "train/shared-pool-folds.json"
    assert "fold evidence in train/shared-pool-folds.json" in result.stderr
    assert (tmp_path / "docs" / "figures" / "loso_risk_coverage.png").exists()
