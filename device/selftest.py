"""Self-test: the bundle validates and each of its sample photos gives the label it was shipped with.

Run by `mushcam selftest`, by the daemon at start and before a reload takes effect, and by
deploy/flash.sh on the device before it switches the `current` link.
"""

from __future__ import annotations

from dataclasses import dataclass

from device.bundle import Bundle
from device.classifier import Classifier
from device.errors import BundleError, MushcamError


@dataclass
class SampleCheck:
    file: str
    expected: str
    got: str | None
    confidence: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.got == self.expected


def check_samples(bundle: Bundle, classifier: Classifier | None = None) -> list[SampleCheck]:
    """Classify every sample of the bundle; a bundle without samples fails (nothing would be checked)."""
    if not bundle.samples:
        raise BundleError(f"{bundle.path}: model.json lists no `samples`, so the self-test cannot check the model")
    classifier = classifier or Classifier(bundle)
    checks = []
    for s in bundle.samples:
        rel = str(s.path.relative_to(bundle.path))
        try:
            probs, _ = classifier.scores(s.path)
            top = int(probs.argmax())
            checks.append(SampleCheck(rel, s.label, bundle.labels[top], float(probs[top])))
        except MushcamError as e:
            checks.append(SampleCheck(rel, s.label, None, 0.0, str(e)))
    return checks


def require_samples_pass(bundle: Bundle, classifier: Classifier | None = None) -> list[SampleCheck]:
    """check_samples, raising BundleError (one line) when any sample is wrong."""
    checks = check_samples(bundle, classifier)
    bad = [c for c in checks if not c.ok]
    if bad:
        c = bad[0]
        what = c.error or f"classified as {c.got}, expected {c.expected}"
        raise BundleError(f"{bundle.path}: self-test failed on {len(bad)}/{len(checks)} samples ({c.file}: {what})")
    return checks
