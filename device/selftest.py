"""Self-test: the bundle validates and each of its sample photos gives the label (and, when the card
records one, the verdict) it was shipped with, with finite probabilities and unknown-species score.

The samples are classified from the bytes load_bundle verified against the card, never re-read from disk.

Run by `mushcam selftest`, by the daemon at start and before a reload takes effect, and by
deploy/flash.sh on the device before it switches the `current` link.
"""

from __future__ import annotations

import math
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
    expected_verdict: str | None = None
    verdict: str | None = None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.got == self.expected
                and (self.expected_verdict is None or self.verdict == self.expected_verdict))

    @property
    def problem(self) -> str:
        """What is wrong, in a few words (empty when ok)."""
        if self.error:
            return self.error
        if self.got != self.expected:
            return f"classified as {self.got}, expected {self.expected}"
        if not self.ok:
            return f"verdict {self.verdict}, expected {self.expected_verdict}"
        return ""


def check_samples(bundle: Bundle, classifier: Classifier | None = None) -> list[SampleCheck]:
    """Classify every sample of the bundle; a bundle without samples fails (nothing would be checked)."""
    if not bundle.samples:
        raise BundleError(f"{bundle.path}: model.json lists no `samples`, so the self-test cannot check the model")
    classifier = classifier or Classifier(bundle)
    checks = []
    for s in bundle.samples:
        try:
            r = classifier.classify(bundle.file_bytes(s.file))
            if not all(math.isfinite(p) for p in r.probs) or (r.ood_score is not None and not math.isfinite(r.ood_score)):
                raise BundleError("a probability or the unknown-species score is not finite")
            top = int(r.probs.argmax())
            checks.append(SampleCheck(s.file, s.label, bundle.labels[top], float(r.probs[top]),
                                      expected_verdict=s.verdict, verdict=r.verdict))
        except MushcamError as e:
            checks.append(SampleCheck(s.file, s.label, None, 0.0, str(e), expected_verdict=s.verdict))
    return checks


def require_samples_pass(bundle: Bundle, classifier: Classifier | None = None) -> list[SampleCheck]:
    """check_samples, raising BundleError (one line) when any sample is wrong."""
    checks = check_samples(bundle, classifier)
    bad = [c for c in checks if not c.ok]
    if bad:
        c = bad[0]
        raise BundleError(f"{bundle.path}: self-test failed on {len(bad)}/{len(checks)} samples ({c.file}: {c.problem})")
    return checks
