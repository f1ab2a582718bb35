"""train/arch.py and `mushcam-train evaluate --arch aarch64`: per-photo differences between two CPUs, the
margins suggested from them, and the CLI path through a stand-in for deploy/pi-check.sh."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from device.bundle import load_bundle
from train import arch
from train.cli import app


def row(path, probs, ood, bundle):
    from device.verdict import decide

    d = decide(probs, bundle.labels, bundle.classes, bundle.thresholds, ood)
    return {"path": path, "label": d.label, "confidence": d.confidence, "verdict": d.verdict.value,
            "ood_score": ood, "poisonous_mass": d.poisonous_mass, "latency_ms": 1.0,
            "probs": dict(zip(bundle.labels, probs))}


@pytest.fixture
def tiny(tiny_bundle):
    return load_bundle(tiny_bundle)  # labels red_cap (edible), green_cap, blue_cap; edible >= 0.9, ood <= 6


def test_identical_rows_need_no_margin(tiny):
    rows = [row("a", [0.95, 0.03, 0.02], 1.0, tiny), row("b", [0.1, 0.8, 0.1], 2.0, tiny)]
    j = arch.jitter(tiny, rows, [dict(r) for r in rows], known=2)
    assert j["verdict_flips"] == 0 and j["suggested"] == {"confidence_margin": 0.0, "ood_margin": 0.0, "mass_margin": 0.0}
    assert j["abs_delta_confidence"]["max"] == 0.0 and j["with_suggested"]["verdict_differences"] == 0


def test_a_flip_across_the_edible_threshold_sets_the_margin(tiny):
    # UNSURE on one CPU (0.88), EDIBLE on the other (0.96): the band must cover the 0.08 between them.
    x86 = [row("a", [0.88, 0.06, 0.06], 1.0, tiny), row("b", [0.2, 0.7, 0.1], 1.0, tiny)]
    arm = [row("a", [0.96, 0.02, 0.02], 1.004, tiny), row("b", [0.2, 0.7, 0.1], 1.0, tiny)]
    j = arch.jitter(tiny, x86, arm, known=2)
    assert j["verdict_flips"] == 1 and j["flips"][0]["x86_64"] == "UNSURE" and j["flips"][0]["aarch64"] == "EDIBLE"
    assert j["one_sided_edible_at_zero_margin"] == 1
    assert j["suggested"]["ood_margin"] == 0.004
    m, mm = j["suggested"]["confidence_margin"], j["suggested"]["mass_margin"]
    # The cheapest fix: photo a's x86 mass is 0.12 and its aarch64 mass 0.04, under the 0.05 limit; a mass
    # margin of 0.011 stops aarch64's EDIBLE and costs no other EDIBLE answer (there is none).
    assert (m, mm) == (0.0, 0.011)
    pairs = list(zip(x86, arm))
    assert arch.hard_disagreements(tiny, pairs, m, 0.004, mm) == []
    assert arch.hard_disagreements(tiny, pairs, m, 0.004, 0.01) == [0]
    assert arch.hard_disagreements(tiny, pairs, 0.061, 0.004, 0.0) == []  # or a confidence margin past 0.06
    assert j["with_suggested"]["edible_known_species"] == {"x86_64": 0, "aarch64": 0}
    assert j["near_thresholds"]["photos"] == 1 and j["near_thresholds"]["verdict_flips"] == 1


def test_the_margins_keep_the_most_edible_answers(tiny):
    # Photo a: mass 0.04 on x86 (EDIBLE), 0.06 on aarch64 (UNSURE). A confidence margin past 0.06 would stop
    # x86's EDIBLE but also photo b's (confidence 0.963); a mass margin of 0.011 stops a's and keeps b's.
    x86 = [row("a", [0.96, 0.02, 0.02], 1.0, tiny), row("b", [0.963, 0.02, 0.017], 1.0, tiny)]
    arm = [row("a", [0.94, 0.03, 0.03], 1.0, tiny), dict(x86[1])]
    j = arch.jitter(tiny, x86, arm, known=2)
    assert j["one_sided_edible_at_zero_margin"] == 1
    assert j["suggested"]["mass_margin"] == pytest.approx(0.01, abs=0.0011) and j["suggested"]["confidence_margin"] == 0.0
    assert j["with_suggested"]["edible_known_species"] == {"x86_64": 1, "aarch64": 1}


def test_the_suggestion_never_loosens_the_cards_own_margins(tiny):
    # Photo a (a look-alike) is EDIBLE at the raw thresholds on both CPUs (0.955 / 0.965 >= 0.9), so no
    # margin is needed for the CPUs to agree and, from zero, the suggestion is no margin at all. A card
    # that decides at 0.9 + 0.06 keeps x86 at UNSURE; a suggestion must not hand that back.
    x86 = [row("a", [0.955, 0.025, 0.02], 1.0, tiny)]
    arm = [row("a", [0.965, 0.02, 0.015], 1.0, tiny)]
    assert arch.jitter(tiny, x86, arm, known=1)["suggested"]["confidence_margin"] == 0.0
    card = replace(tiny, thresholds=replace(tiny.thresholds, confidence_margin=0.06, ood_margin=0.01, mass_margin=0.003))
    j = arch.jitter(card, x86, arm, known=1)
    assert j["suggested"] == {"confidence_margin": 0.06, "ood_margin": 0.01, "mass_margin": 0.003}
    assert j["with_suggested"]["edible_known_species"]["x86_64"] == 0


def test_an_ood_difference_across_the_limit_is_caught(tiny):
    x86 = [row("a", [0.97, 0.02, 0.01], 5.99, tiny)]
    arm = [row("a", [0.97, 0.02, 0.01], 6.01, tiny)]  # unfamiliar on the Pi: UNSURE
    j = arch.jitter(tiny, x86, arm, known=1)
    assert (j["flips"][0]["x86_64"], j["flips"][0]["aarch64"]) == ("EDIBLE", "UNSURE")
    assert j["suggested"]["ood_margin"] == pytest.approx(0.02)
    strict = replace(tiny.thresholds, ood_margin=j["suggested"]["ood_margin"])
    assert arch._decide(tiny, x86[0], strict).value == "UNSURE"


def test_unseen_species_are_counted_apart(tiny):
    x86 = [row("a", [0.97, 0.02, 0.01], 1.0, tiny), row("u", [0.95, 0.03, 0.02], 1.0, tiny)]
    arm = [dict(r) for r in x86]
    j = arch.jitter(tiny, x86, arm, known=1)
    assert (j["known_species"], j["unseen_species"]) == (1, 1)
    assert j["edible_unseen_species"] == {"x86_64": 1, "aarch64": 1}
    assert j["edible_known_species"] == {"x86_64": 1, "aarch64": 1}


def test_errors_on_either_side_are_left_out(tiny):
    ok = row("a", [0.97, 0.02, 0.01], 1.0, tiny)
    j = arch.jitter(tiny, [ok, {"path": "b", "error": "bad"}], [dict(ok), row("b", [0.97, 0.02, 0.01], 1.0, tiny)], 2)
    assert j["photos"] == 1


def test_common_dirs():
    got = arch._common_dirs([Path("/a/b/c/1.jpg"), Path("/a/b/2.jpg"), Path("/x/3.jpg")])
    assert got == [Path("/a/b"), Path("/x")]
    # Hundreds of species folders become their parent, not hundreds of mounts; never above two levels.
    many = [Path(f"/w/s/other/taxon{i}/p.jpg") for i in range(50)] + [Path("/w/s/known/a/p.jpg")]
    assert arch._common_dirs(many, most=4) == [Path("/w/s/known"), Path("/w/s/other")]
    assert arch._common_dirs(many, most=1) == [Path("/w/s")]
    assert arch._common_dirs([Path(f"/t{i}/p.jpg") for i in range(5)], most=1) == [Path(f"/t{i}") for i in range(5)]


# --- the CLI, with a stand-in for deploy/pi-check.sh that runs this machine's classifier ---------------

FAKE_PI_CHECK = """#!/bin/bash
# stand-in: `exec [--bind DIR]... -- /opt/mushcam/venv/bin/mushcam ARGS`; records the binds, runs ARGS here,
# and nudges the first photo's confidence as another CPU might.
[[ $1 == exec ]] || exit 9
shift
while [[ $1 == --bind ]]; do echo "$2" >>"{log}"; shift 2; done
[[ $1 == -- && $2 == /opt/mushcam/venv/bin/mushcam ]] || exit 9
shift 2
"{python}" -m device "$@" | "{python}" -c '
import json, sys
for i, line in enumerate(sys.stdin):
    r = json.loads(line)
    if i == 0:
        r["confidence"] -= 0.01
    print(json.dumps(r))
'
"""


@pytest.fixture
def data_dir(tiny_bundle, tmp_path):
    d = tmp_path / "data"
    for f in (tiny_bundle / "samples").iterdir():
        (d / f.stem).mkdir(parents=True)
        shutil.copy(f, d / f.stem / f.name)
    return d


def test_evaluate_arch_aarch64_records_both_and_the_jitter(bundle_copy, data_dir, tmp_path, monkeypatch):
    log = tmp_path / "binds.log"
    fake = tmp_path / "pi-check.sh"
    fake.write_text(FAKE_PI_CHECK.format(log=log, python=sys.executable))
    monkeypatch.setattr(arch, "PI_CHECK", fake)
    unseen = tmp_path / "unseen" / "some_taxon"
    unseen.mkdir(parents=True)
    shutil.copy(data_dir / "red_cap" / "red_cap.jpg", unseen / "x.jpg")
    r = CliRunner().invoke(app, ["evaluate", str(bundle_copy), str(data_dir), "--arch", "aarch64", "--json",
                                 "--record", "--unseen", str(tmp_path / "unseen"), "--rows", str(tmp_path / "rows.json")])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["x86_64"]["n"] == out["aarch64"]["n"] == 3
    j = out["arch_jitter"]
    assert (j["photos"], j["unseen_species"]) == (4, 1)
    assert j["abs_delta_confidence"]["max"] == pytest.approx(0.01)
    # Every photo folder and the bundle were bind-mounted into the root.
    binds = set(log.read_text().split())
    assert str(bundle_copy.resolve()) in binds and str(unseen.resolve()) in binds
    card = json.loads((bundle_copy / "model.json").read_text())
    # A DATA_DIR is not the model's own WORK dir: its photos may be training photos, so no metrics.test.
    assert "arch_jitter" in card["metrics"] and "test_aarch64" not in card["metrics"]
    assert "recording only metrics.arch_jitter" in r.stderr
    assert j["figures"]["aarch64"]["n"] == 3
    assert card["metrics"]["arch_jitter"]["suggested"] == j["suggested"]
    load_bundle(bundle_copy)  # still a valid bundle
    saved = json.loads((tmp_path / "rows.json").read_text())
    assert saved["known"] == 3 and len(saved["x86_64"]) == len(saved["aarch64"]) == 4


def test_evaluate_arch_records_the_split_metrics_for_the_same_split_prepared_elsewhere(
        bundle_copy, data_dir, tmp_path, monkeypatch, edit_card):
    from train.dataset import FORMAT, MANIFEST, split_sha256

    fake = tmp_path / "pi-check.sh"
    fake.write_text(FAKE_PI_CHECK.format(log=tmp_path / "binds.log", python=sys.executable))
    monkeypatch.setattr(arch, "PI_CHECK", fake)
    card = json.loads((bundle_copy / "model.json").read_text())
    images = [{"path": f"{d.name}/{f.name}", "label": d.name, "sha256": "0" * 64, "phash": "0" * 16, "group": i,
               "split": "test", "species": ""}
              for i, d in enumerate(sorted(data_dir.iterdir())) for f in d.iterdir()]
    work = tmp_path / "work"
    work.mkdir()
    doc = {"format": FORMAT, "created": "2026-12-05T19:00:00Z", "data_dir": str(data_dir), "seed": 0,
           "labels": card["labels"], "classes": card["classes"], "images": images}
    (work / MANIFEST).write_text(json.dumps(doc))
    # The card was made on another machine: another manifest file (time, absolute folder), the same split.
    edit_card(bundle_copy, lambda c: c.setdefault("training", {}).update(
        {"manifest_sha256": "f" * 64, "split_sha256": split_sha256(work / MANIFEST)}))
    r = CliRunner().invoke(app, ["evaluate", str(bundle_copy), str(work), "--arch", "aarch64", "--record"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((bundle_copy / "model.json").read_text())["metrics"]
    assert metrics["test"]["n"] == metrics["test_aarch64"]["n"] == 3
    # Another split (one photo on another side) records only the jitter.
    doc["images"][0]["split"] = "train"
    (work / MANIFEST).write_text(json.dumps(doc))
    edit_card(bundle_copy, lambda c: c["metrics"].pop("test_aarch64"))
    r = CliRunner().invoke(app, ["evaluate", str(bundle_copy), str(work), "--arch", "aarch64", "--record"])
    assert r.exit_code == 0, r.output
    assert "test_aarch64" not in json.loads((bundle_copy / "model.json").read_text())["metrics"]
    assert "recording only metrics.arch_jitter" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--arch", "arm"], "x86_64, aarch64"),
    (["--unseen", "."], "--arch aarch64"),
    (["--rows", "r.json"], "--arch aarch64"),
])
def test_evaluate_arch_options_are_checked(tiny_bundle, data_dir, args, message):
    r = CliRunner().invoke(app, ["evaluate", str(tiny_bundle), str(data_dir), *args])
    assert r.exit_code == 2 and message in r.output
