"""Load and validate a model bundle (docs/model-bundle.md): the contract between train/ and device/.

Everything the device relies on is checked here, before any frame is classified, and a bad bundle is
refused with one line that names the file or field at fault.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from device.errors import BundleError
from device.preprocess import InputSpec

log = logging.getLogger("mushcam.bundle")

FORMAT = "mushcam-bundle/1"
CARD = "model.json"
MODEL = "model.tflite"
EDGETPU_MODEL = "model_edgetpu.tflite"
EDIBILITY = ("edible", "poisonous")
ROLES = ("edible", "poisonous", "other")  # "other": not one of the known species; never EDIBLE
OUTPUT_DTYPES = ("int8", "uint8")


@dataclass(frozen=True)
class Thresholds:
    """Verdict thresholds (device.verdict.decide). Defaults are deliberately strict."""

    edible_min_confidence: float = 0.9
    poisonous_max_mass: float = 0.02
    poisonous_min_confidence: float = 0.5
    ood_max_score: float | None = None  # None: the bundle has no unknown-species score
    # Cross-architecture margins, applied by decide towards UNSURE: the calibrated thresholds were chosen on
    # this machine's int8 arithmetic; the Pi's differs slightly, so the device is stricter by the jitter.
    confidence_margin: float = 0.0
    ood_margin: float = 0.0

    @classmethod
    def from_dict(cls, d: Any) -> "Thresholds":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise BundleError("model.json: `thresholds` must be an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BundleError(f"model.json: unknown key `thresholds.{unknown[0]}` (known: {', '.join(sorted(known))})")
        values = {}
        for name, v in d.items():
            if v is None and name == "ood_max_score":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BundleError(f"model.json: `thresholds.{name}` must be a number, got {v!r}")
            if name not in ("ood_max_score", "ood_margin") and not 0.0 <= v <= 1.0:
                raise BundleError(f"model.json: `thresholds.{name}` = {v} is outside 0..1")
            if name == "ood_max_score" and v <= 0:
                raise BundleError(f"model.json: `thresholds.ood_max_score` = {v} must be > 0")
            if name == "ood_margin" and v < 0:
                raise BundleError(f"model.json: `thresholds.ood_margin` = {v} must be >= 0")
            values[name] = float(v)
        return cls(**values)


@dataclass(frozen=True)
class OutputSpec:
    """One integer output tensor of the model: where it is and how to dequantize it."""

    index: int
    size: int
    dtype: str
    scale: float
    zero_point: int

    @classmethod
    def from_dict(cls, name: str, d: Any) -> "OutputSpec":
        if not isinstance(d, dict):
            raise BundleError(f"model.json: `outputs.{name}` must be an object")
        try:
            spec = cls(int(d["index"]), int(d["size"]), str(d["dtype"]), float(d["scale"]), int(d["zero_point"]))
        except KeyError as e:
            raise BundleError(f"model.json: `outputs.{name}.{e.args[0]}` is missing") from None
        except (TypeError, ValueError) as e:
            raise BundleError(f"model.json: `outputs.{name}` has a bad value: {e}") from None
        if spec.dtype not in OUTPUT_DTYPES:
            raise BundleError(
                f"model.json: `outputs.{name}.dtype` is {spec.dtype!r}; the bundle promises integer outputs "
                f"({', '.join(OUTPUT_DTYPES)})"
            )
        if spec.scale <= 0 or spec.size < 1 or spec.index < 0:
            raise BundleError(f"model.json: `outputs.{name}` needs scale > 0, size >= 1, index >= 0")
        return spec


@dataclass(frozen=True)
class ClassInfo:
    edibility: str
    display_name: str
    role: str = ""  # edible, poisonous or other; "" = derived from edibility (see `kind`)

    @property
    def kind(self) -> str:
        """The role the verdict policy uses: the card's `role`, else the edibility (old cards)."""
        return self.role or self.edibility


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    source: str = ""


@dataclass
class Bundle:
    """A validated model bundle: the card's contents as typed fields, plus the paths of its files."""

    path: Path
    card: dict
    labels: list[str]
    classes: dict[str, ClassInfo]
    input: InputSpec
    logits: OutputSpec
    embedding: OutputSpec | None
    thresholds: Thresholds
    samples: list[Sample] = field(default_factory=list)
    signer: str | None = None

    @property
    def name(self) -> str:
        return str(self.card.get("name", self.path.name))

    @property
    def version(self) -> str:
        return str(self.card.get("version", "unknown"))

    @property
    def model_path(self) -> Path:
        return self.path / MODEL

    @property
    def model_sha256(self) -> str:
        return self.card["files"][MODEL]

    @property
    def edgetpu_path(self) -> Path | None:
        return self.path / EDGETPU_MODEL if EDGETPU_MODEL in self.card["files"] else None

    @property
    def ood_path(self) -> Path | None:
        ood = self.card.get("ood")
        return self.path / ood["file"] if ood else None

    def edibility(self, label: str) -> str:
        return self.classes[label].edibility

    def display_name(self, label: str) -> str:
        return self.classes[label].display_name


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (a model can be several MB on a Pi with little RAM)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temp file + rename, so a crash never leaves a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # mkstemp makes the file 0600; the daemon's user and deploy tools must be able to read it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_card(bundle_dir: Path, card: dict) -> Path:
    """Write model.json atomically (used by the training toolchain's export)."""
    path = Path(bundle_dir) / CARD
    write_json_atomic(path, card)
    return path


def _read_card(path: Path) -> dict:
    if not path.is_dir():
        raise BundleError(f"{path}: no such model bundle directory (pass --model DIR, or run `make model`)")
    card_path = path / CARD
    if not card_path.is_file():
        raise BundleError(f"{path}: no {CARD}; is this a model bundle? (mushcam-train export writes one)")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{card_path}: not valid JSON ({e}); re-copy the bundle") from None
    if not isinstance(card, dict):
        raise BundleError(f"{card_path}: must hold a JSON object")
    if card.get("format") != FORMAT:
        raise BundleError(f"{card_path}: `format` is {card.get('format')!r}, expected {FORMAT!r}")
    return card


def _labels_and_classes(card: dict) -> tuple[list[str], dict[str, ClassInfo]]:
    labels = card.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise BundleError("model.json: `labels` must be a non-empty list of class names")
    if len(set(labels)) != len(labels):
        raise BundleError("model.json: `labels` has duplicates")
    raw = card.get("classes")
    if not isinstance(raw, dict):
        raise BundleError("model.json: `classes` must map each label to its edibility")
    classes = {}
    no_role = []
    for label in labels:
        info = raw.get(label)
        if not isinstance(info, dict):
            raise BundleError(f"model.json: `classes.{label}` is missing")
        edibility = info.get("edibility")
        if edibility not in EDIBILITY:
            raise BundleError(f"model.json: `classes.{label}.edibility` is {edibility!r}, expected edible or poisonous")
        role = info.get("role")
        if role is None:
            no_role.append(label)
            role = edibility
        elif role not in ROLES:
            raise BundleError(f"model.json: `classes.{label}.role` is {role!r}, expected {', '.join(ROLES)}")
        elif role == "edible" and edibility != "edible":
            # Two fields that disagree about eating: refuse rather than guess which one is right.
            raise BundleError(f"model.json: `classes.{label}` has role edible but edibility {edibility}")
        elif role != "edible" and edibility == "edible":
            raise BundleError(f"model.json: `classes.{label}` has role {role} but edibility edible")
        classes[label] = ClassInfo(edibility, str(info.get("display_name") or label), role)
    if no_role:
        # Old bundles keep working: the role follows from the edibility (an old card has no `other` class).
        log.warning("model.json: no `role` for class(es) %s; derived from edibility (re-export to record roles)",
                    ", ".join(no_role))
    return labels, classes


def _check_files(path: Path, card: dict, check_sha: bool) -> None:
    files = card.get("files")
    if not isinstance(files, dict) or MODEL not in files:
        raise BundleError(f"model.json: `files` must list {MODEL} with its sha256")
    for name, digest in files.items():
        f = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"model.json: `files` entry {name!r} must be a plain name inside the bundle")
        if not f.is_file():
            raise BundleError(f"{f}: missing (listed in model.json `files`); re-copy the bundle")
        if f.stat().st_size == 0:
            raise BundleError(f"{f}: empty file; re-copy the bundle")
        if check_sha and sha256_file(f) != digest:
            raise BundleError(f"{f}: sha256 does not match model.json; the file is corrupt or was changed, re-copy the bundle")


def load_bundle(
    path: str | os.PathLike,
    *,
    check_sha: bool = True,
    require_signature: bool = False,
    allowed_signers: str | os.PathLike | None = None,
) -> Bundle:
    """Read and validate a bundle directory; raise BundleError (one line naming the bad field) if anything is off.

    With `require_signature`, `model.json.sig` must verify against `allowed_signers` (device.signing); the
    card lists every file's sha256, so a valid signature covers the whole bundle.
    """
    path = Path(path)
    card = _read_card(path)
    signer = None
    if require_signature:
        from device.signing import verify_bundle  # ssh-keygen is only needed when signatures are required

        if allowed_signers is None:
            raise BundleError("signatures are required but no allowed_signers file is configured")
        signer = verify_bundle(path, Path(allowed_signers))
    labels, classes = _labels_and_classes(card)
    spec = InputSpec.from_dict(card.get("input"))
    outputs = card.get("outputs")
    if not isinstance(outputs, dict) or "logits" not in outputs:
        raise BundleError("model.json: `outputs.logits` is missing")
    logits = OutputSpec.from_dict("logits", outputs["logits"])
    if logits.size != len(labels):
        raise BundleError(
            f"model.json: {len(labels)} labels but `outputs.logits.size` is {logits.size}; the card does not fit the model"
        )
    embedding = OutputSpec.from_dict("embedding", outputs["embedding"]) if outputs.get("embedding") else None
    thresholds = Thresholds.from_dict(card.get("thresholds"))
    _check_files(path, card, check_sha)
    ood = card.get("ood")
    if ood is not None:
        if not isinstance(ood, dict) or ood.get("file") not in card["files"]:
            raise BundleError("model.json: `ood.file` must be one of the bundle's `files`")
        if embedding is None:
            raise BundleError("model.json: `ood` needs an `outputs.embedding`")
        if thresholds.ood_max_score is None:
            raise BundleError("model.json: `ood` needs `thresholds.ood_max_score`")
    samples = []
    for i, s in enumerate(card.get("samples") or []):
        if not isinstance(s, dict) or s.get("label") not in labels or not isinstance(s.get("file"), str):
            raise BundleError(f"model.json: `samples[{i}]` needs a `file` and a `label` from `labels`")
        samples.append(Sample(path / s["file"], s["label"], str(s.get("source", ""))))
    return Bundle(path, card, labels, classes, spec, logits, embedding, thresholds, samples, signer)
