"""Image(s) -> verdict: preprocessing, the engine, softmax, the unknown-species score and the policy.

The daemon, `mushcam classify`, `mushcam selftest` and the trainer's `evaluate` all go through
`Classifier`, so every figure the toolchain reports is measured on the code the Pi runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from device.bundle import Bundle
from device.engine import Engine, load_engine
from device.errors import BundleError
from device.ood import load_ood
from device.preprocess import ImageSource, preprocess
from device.verdict import Decision, decide, softmax


@dataclass
class Result:
    """What one press (or one file) came to."""

    decision: Decision
    probs: np.ndarray
    ood_score: float | None
    latency_ms: float
    frames: int = 1
    labels: tuple[str, ...] = ()  # the bundle's labels, in the order of `probs`

    def ranked(self, k: int | None = None) -> list[tuple[str, float]]:
        """(label, probability) pairs, most likely first; the top ``k`` if given."""
        order = np.argsort(-np.asarray(self.probs), kind="stable")[:k]
        return [(self.labels[i], float(self.probs[i])) for i in order]

    @property
    def runner_up(self) -> tuple[str, float] | None:
        """The second most likely label and its probability (None with a single label)."""
        top2 = self.ranked(2)
        return top2[1] if len(top2) == 2 else None

    @property
    def label(self) -> str | None:
        return self.decision.label

    @property
    def confidence(self) -> float:
        return self.decision.confidence

    @property
    def verdict(self) -> str:
        return self.decision.verdict.value


class Classifier:
    """Holds one bundle's engine and scorer; built once, used for every frame."""

    def __init__(self, bundle: Bundle, engine: Engine | None = None, backend: str = "auto", threads: int | None = None):
        self.bundle = bundle
        self.engine = engine or load_engine(bundle, backend, threads)
        self.ood = None
        if bundle.ood_file:
            # The verified bytes; the score must be the kind the card's threshold was calibrated (and floored) for.
            self.ood = load_ood(bundle.file_bytes(bundle.ood_file), name=bundle.ood_path,
                                method=bundle.card["ood"].get("method", "mahalanobis"))
        if self.ood is not None and bundle.embedding is not None and self.ood.embedding_size != bundle.embedding.size:
            raise BundleError(
                f"{bundle.ood_path}: made for {self.ood.embedding_size}-value embeddings but the model's have "
                f"{bundle.embedding.size}; re-export the bundle"
            )

    def scores(self, image: ImageSource) -> tuple[np.ndarray, float | None]:
        """Probabilities and unknown-species score of one image."""
        out = self.engine.run(preprocess(image, self.bundle.input))
        ood = self.ood.score(out.embedding) if self.ood is not None and out.embedding is not None else None
        return softmax(out.logits), ood

    def classify(self, image: ImageSource) -> Result:
        return self.classify_frames([image])

    def classify_frames(self, images: Sequence[ImageSource]) -> Result:
        """Decide on several frames of one press: mean probabilities, and the worst unknown-species score."""
        t0 = time.perf_counter()
        probs, oods = [], []
        for image in images:
            p, o = self.scores(image)
            probs.append(p)
            oods.append(o)
        mean = np.mean(probs, axis=0)
        # The farthest frame counts: one frame that looks unfamiliar is reason enough for doubt.
        ood = None if any(o is None for o in oods) else max(oods)
        b = self.bundle
        decision = decide(mean, b.labels, b.classes, b.thresholds, ood)
        return Result(decision, mean, ood, (time.perf_counter() - t0) * 1000.0, len(images), tuple(b.labels))
