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
import re
import stat
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

from device.errors import BundleError, SignatureError
from device.preprocess import InputSpec

log = logging.getLogger("mushcam.bundle")

FORMAT = "mushcam-bundle/1"
CARD = "model.json"
MODEL = "model.tflite"
EDGETPU_MODEL = "model_edgetpu.tflite"
SIGNATURE = "model.json.sig"
EDIBILITY = ("edible", "poisonous")
ROLES = ("edible", "poisonous", "other")  # "other": not one of the known species; never EDIBLE
OUTPUT_DTYPES = ("int8", "uint8")
VERDICTS = ("EDIBLE", "POISONOUS", "UNSURE")
OOD_METHODS = ("knn", "mahalanobis")

# Size caps, checked before a byte is parsed: a Pi has 1 GB and serves while it loads a new bundle.
CARD_MAX_BYTES = 1 << 20  # the shipped card is ~11 KB
CARD_MAX_DEPTH = 32  # the shipped card nests 6 deep; json's recursion would crash long before 100,000
SIGNATURE_MAX_BYTES = 64 << 10  # an armoured SSH signature is under 1 KB
FILE_MAX_BYTES = 64 << 20  # one listed file (the shipped model is 2.7 MB, its ood.npz 3.3 MB)
BUNDLE_MAX_BYTES = 160 << 20  # all listed files together, held in memory while the bundle is served
MAX_FILES = 1000

# Hard safety floors: a card past them is refused whoever wrote (or signed) it. The trainer calibrates
# inside them; they only stop a card loosened by mistake or by someone with write access to the disk.
# (name, bound, "min"|"max", why)
SAFETY_FLOORS = (
    ("edible_min_confidence", 0.5, "min", "below 0.5 another species can be as likely as the edible one"),
    ("poisonous_max_mass", 0.25, "max", "more than a quarter of the belief on poisonous species is no EDIBLE"),
    ("poisonous_min_confidence", 0.5, "min", "a weaker poisonous guess must read UNSURE, not a species"),
    ("confidence_margin", 0.0, "min", "a margin only ever makes the device stricter"),
    ("ood_margin", 0.0, "min", "a margin only ever makes the device stricter"),
    ("mass_margin", 0.0, "min", "a margin only ever makes the device stricter"),
)
# `ood_max_score` ceilings per score: at or past them the unknown-species check can no longer say no.
# knn: 1 - mean cosine similarity; 1.0 means "as similar as an unrelated direction" (the shipped card: 0.35).
# mahalanobis: distance per PCA dimension in standard deviations; 10 is far past any calibrated value
# (the tiny test bundle's is 6.0), a judgement rather than a measurement.
OOD_SCORE_CEILING = {"knn": 1.0, "mahalanobis": 10.0}


@dataclass(frozen=True)
class Thresholds:
    """Verdict thresholds (device.verdict.decide). Defaults are deliberately strict."""

    edible_min_confidence: float = 0.9
    poisonous_max_mass: float = 0.02
    poisonous_min_confidence: float = 0.5
    ood_max_score: float | None = None  # None: the bundle has no unknown-species score
    # Safety bands towards UNSURE (device.verdict.decide): a verdict needs its figures this far past the
    # calibrated threshold, the measured cross-architecture jitter (x86-64 vs aarch64 int8 arithmetic),
    # so that no CPU computes a verdict the other would not. Export writes them; 0 for older cards.
    confidence_margin: float = 0.0
    ood_margin: float = 0.0
    # EDIBLE also needs the poisonous mass this far under poisonous_max_mass: the CPUs' mass differs too.
    mass_margin: float = 0.0

    @property
    def ood_limit(self) -> float | None:
        """The highest unknown-species score that still counts as familiar: ood_max_score less the
        cross-architecture margin (None when the bundle has no score). device.verdict decides with it."""
        if self.ood_max_score is None:
            return None
        return self.ood_max_score - max(0.0, float(self.ood_margin))

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
            if name == "ood_margin" and v < 0:
                raise BundleError(f"model.json: `thresholds.ood_margin` = {v} must be >= 0 (a margin only makes verdicts stricter)")
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
    """A photo shipped in the bundle with the label (and, when the card says, the verdict) it must give."""

    path: Path
    label: str
    source: str = ""
    verdict: str | None = None  # EDIBLE / POISONOUS / UNSURE when the card records it
    file: str = ""  # its name in the card's `files` (its bytes: Bundle.file_bytes(file))


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
    # The verified bytes of every file in `files`, read once: the engine, the unknown-species score and
    # the self-test use these, never the files again (which may have changed since they were checked).
    data: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)
    # sha256 of the very card (and signature, when there is one) bytes that were verified and parsed: compare
    # these with what was pushed rather than hashing the files again.
    card_sha256: str = ""
    signature_sha256: str | None = None

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

    @property
    def ood_file(self) -> str | None:
        ood = self.card.get("ood")
        return ood["file"] if ood else None

    def file_bytes(self, name: str) -> bytes:
        """The verified bytes of a file listed in the card's `files` (read once by load_bundle)."""
        try:
            return self.data[name]
        except KeyError:
            raise BundleError(f"{self.path / name}: not among the bundle's verified `files`") from None

    def thresholds_line(self) -> str:
        """The thresholds in effect, for the load log and the self-test's output."""
        t = self.thresholds
        parts = [f"{f.name}={getattr(t, f.name)}" for f in fields(t)]
        return "thresholds in effect: " + ", ".join(parts)

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


def write_json_atomic(path: Path, data: Any, mode: int | None = None) -> None:
    """Write JSON through a temp file + rename, so a crash never leaves a half-written file.

    The file gets `mode` when given (whatever the umask), else 0666 minus the umask.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # mkstemp makes the file 0600; the daemon's user and deploy tools must be able to read it.
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
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


def read_capped(path: Path, cap: int, what: str = "file") -> bytes:
    """Read one regular file once, refusing it (one line) before reading when it is bigger than `cap`.

    Not through a symlink (a bundle holds plain files) and never a FIFO or device (which could block or
    never end): the size is checked on the open handle, and at most cap + 1 bytes are read from it.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise BundleError(f"{path}: missing ({what}); re-copy the bundle") from None
    except OSError as e:
        if os.path.islink(path):
            raise BundleError(f"{path}: is a symlink; a bundle holds plain files, re-copy it") from None
        raise BundleError(f"{path}: cannot read it ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{path}: not a regular file; a bundle holds plain files, re-copy it")
        if st.st_size > cap:
            raise BundleError(f"{path}: {st.st_size} bytes, over the {cap}-byte limit for a {what}; refused unread")
        data = f.read(cap + 1)
    if len(data) > cap:  # it grew while being read
        raise BundleError(f"{path}: over the {cap}-byte limit for a {what}; refused")
    return data


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (lists and objects), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_card(data: bytes, card_path: Path) -> dict:
    """Parse the card's bytes (already read once, size-capped); one BundleError line if they are not a card."""
    try:
        card = json.loads(data.decode("utf-8"))
    except RecursionError:  # the C parser stops itself at Python's recursion limit (~1000 levels)
        card = None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{card_path}: not valid JSON ({e}); re-copy the bundle") from None
    if card is None or _depth(card) > CARD_MAX_DEPTH:
        raise BundleError(f"{card_path}: JSON nested deeper than {CARD_MAX_DEPTH} levels; not a model card")
    if not isinstance(card, dict):
        raise BundleError(f"{card_path}: must hold a JSON object")
    if card.get("format") != FORMAT:
        raise BundleError(f"{card_path}: `format` is {card.get('format')!r}, expected {FORMAT!r}")
    return card


def plain_name(name: Any, where: str) -> str:
    """A relative path inside the bundle (`samples/x.jpg`): no absolute path, no `..`, no backslash."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise BundleError(f"model.json: {where} {name!r} must be a plain relative name inside the bundle")
    p = PurePosixPath(name)
    if p.is_absolute() or any(part in ("..", ".", "") for part in name.split("/")):
        raise BundleError(f"model.json: {where} {name!r} must be a plain name inside the bundle (no absolute path, no ..)")
    return name


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


def _read_files(path: Path, card: dict, check_sha: bool, signed: bool) -> dict[str, bytes]:
    """Read every file in `files` once, check its sha256 on those bytes, and return the bytes."""
    files = card.get("files")
    if not isinstance(files, dict) or MODEL not in files:
        raise BundleError(f"model.json: `files` must list {MODEL} with its sha256")
    if len(files) > MAX_FILES:
        raise BundleError(f"model.json: `files` lists {len(files)} files, more than {MAX_FILES}")
    data: dict[str, bytes] = {}
    total = 0
    for name, digest in files.items():
        plain_name(name, "`files` entry")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise BundleError(f"model.json: `files.{name}` must be a sha256 (64 hex digits)")
        f = path / name
        blob = read_capped(f, min(FILE_MAX_BYTES, BUNDLE_MAX_BYTES - total), "bundle file (listed in model.json `files`)")
        total += len(blob)
        if not blob:
            raise BundleError(f"{f}: empty file; re-copy the bundle")
        if check_sha and hashlib.sha256(blob).hexdigest() != digest:
            if signed:
                raise SignatureError(
                    f"{f}: tampered or corrupt, its sha256 differs from the signed card; "
                    "copy the bundle again from a trusted source"
                )
            raise BundleError(f"{f}: sha256 does not match model.json; the file is corrupt or was changed, re-copy the bundle")
        data[name] = blob
    return data


def check_safety_floors(t: Thresholds, ood_method: str | None) -> None:
    """Refuse thresholds past the hard floors (SAFETY_FLOORS, OOD_SCORE_CEILING), one line naming the key."""
    for name, bound, kind, why in SAFETY_FLOORS:
        if not hasattr(t, name):
            continue
        v = getattr(t, name)
        if (kind == "min" and v < bound) or (kind == "max" and v > bound):
            sign = ">=" if kind == "min" else "<="
            raise BundleError(f"model.json: `thresholds.{name}` = {v} is past the safety floor ({sign} {bound}: {why}); refused")
    if ood_method is not None and t.ood_max_score is not None:
        ceiling = OOD_SCORE_CEILING[ood_method]
        if t.ood_max_score >= ceiling:
            raise BundleError(
                f"model.json: `thresholds.ood_max_score` = {t.ood_max_score} is past the safety ceiling for a "
                f"{ood_method} score (< {ceiling}: the unknown-species check would never say no); refused"
            )


def load_bundle(
    path: str | os.PathLike,
    *,
    check_sha: bool = True,
    require_signature: bool = False,
    allowed_signers: str | os.PathLike | None = None,
    identity: str | None = None,
) -> Bundle:
    """Read and validate a bundle directory; raise BundleError (one line naming the bad field) if anything is off.

    This is the one place that verifies a bundle's bytes. Each file is read once: `model.json` (size- and
    depth-capped), with `require_signature` its `model.json.sig` checked against `allowed_signers` over
    those same bytes (device.signing), then parsed; every file in `files` read into memory and hashed,
    and the returned Bundle serves those bytes (`file_bytes`), so a file swapped on disk after the check
    is never used. The card lists every file the device reads with its sha256, so a valid signature covers
    the whole bundle. Thresholds past the hard safety floors are refused; those in effect are logged.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: no such model bundle directory (pass --model DIR, or run `make model`)")
    card_path = path / CARD
    if not os.path.lexists(card_path):
        raise BundleError(f"{path}: no {CARD}; is this a model bundle? (mushcam-train export writes one)")
    card_bytes = read_capped(card_path, CARD_MAX_BYTES, "model card")
    sig_path = path / SIGNATURE
    sig_bytes = read_capped(sig_path, SIGNATURE_MAX_BYTES, "signature") if os.path.lexists(sig_path) else None
    signer = None
    if require_signature:
        from device.signing import verify_card  # ssh-keygen is only needed when signatures are required

        if allowed_signers is None or str(allowed_signers) == "":
            raise BundleError("signatures are required but no allowed_signers file is configured")
        if sig_bytes is None:
            raise SignatureError(
                f"{path}: unsigned bundle (no {SIGNATURE}) but a signature is required; "
                "sign it with `mushcam-train sign BUNDLE --key KEY`"
            )
        signer = verify_card(card_bytes, sig_bytes, Path(allowed_signers), identity=identity, where=path)
    card = parse_card(card_bytes, card_path)
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
    files = card.get("files")
    if not isinstance(files, dict) or MODEL not in files:
        raise BundleError(f"model.json: `files` must list {MODEL} with its sha256")
    ood = card.get("ood")
    ood_method = None
    if ood is not None:
        if not isinstance(ood, dict) or ood.get("file") not in files:
            raise BundleError("model.json: `ood.file` must be one of the bundle's `files`")
        ood_method = ood.get("method", "mahalanobis")
        if ood_method not in OOD_METHODS:
            raise BundleError(f"model.json: `ood.method` is {ood_method!r}; valid: {', '.join(OOD_METHODS)}")
        if embedding is None:
            raise BundleError("model.json: `ood` needs an `outputs.embedding`")
        if thresholds.ood_max_score is None:
            raise BundleError("model.json: `ood` needs `thresholds.ood_max_score`")
    check_safety_floors(thresholds, ood_method)
    raw_samples = card.get("samples") or []
    if not isinstance(raw_samples, list):
        raise BundleError("model.json: `samples` must be a list")
    samples = []
    for i, s in enumerate(raw_samples):
        if not isinstance(s, dict) or s.get("label") not in labels or not isinstance(s.get("file"), str):
            raise BundleError(f"model.json: `samples[{i}]` needs a `file` and a `label` from `labels`")
        name = plain_name(s["file"], f"`samples[{i}].file`")
        if name not in files:
            raise BundleError(
                f"model.json: `samples[{i}].file` {name!r} is not listed in `files` with its sha256; "
                "every file the device reads must be (re-export the bundle)"
            )
        verdict = s.get("verdict")
        if verdict is not None and verdict not in VERDICTS:
            raise BundleError(f"model.json: `samples[{i}].verdict` is {verdict!r}; valid: {', '.join(VERDICTS)}")
        samples.append(Sample(path / name, s["label"], str(s.get("source", "")), verdict, name))
    data = _read_files(path, card, check_sha, signed=signer is not None)
    bundle = Bundle(path, card, labels, classes, spec, logits, embedding, thresholds, samples, signer, data,
                    hashlib.sha256(card_bytes).hexdigest(),
                    hashlib.sha256(sig_bytes).hexdigest() if sig_bytes is not None else None)
    log.info("bundle %s %s from %s: %s", bundle.name, bundle.version, path, bundle.thresholds_line())
    return bundle
