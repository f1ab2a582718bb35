"""Training hyper-parameters: one documented dataclass, written into WORK/fit.json and the model card."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from device.errors import ConfigError


@dataclass
class HParams:
    """Everything `mushcam-train fit` can be told, with defaults chosen for a 2-core CPU workstation.

    Training runs in two stages (see train/fit.py):

    1. head: the backbone is frozen; its pooled features are computed once for `feature_copies` copies
       of each training image (copy 0 untouched, the others augmented) and a linear head is trained on
       those cached features for up to `epochs` epochs. Exact, because a frozen backbone in inference
       mode is a fixed function of its input; the only approximation is that augmentation is drawn
       from a fixed pool of copies instead of afresh each epoch.
    2. fine-tune: the top `fine_tune_fraction` of the backbone's layers are unfrozen (BatchNorm layers
       stay frozen and in inference mode) and the whole model trains end to end on freshly augmented
       images at `fine_tune_learning_rate` for up to `fine_tune_epochs` epochs (0 skips the stage).

    Both stages stop early when the validation loss has not improved for `patience` (stage 2:
    `fine_tune_patience`) epochs; the best model over both stages is the one kept (WORK/model.keras).
    """

    backbone: str = "mobilenet_v2"
    """Key of train.model_spec.SPECS: mobilenet_v2, mobilenet_v3_small or mobilenet_v3_large."""
    alpha: float = 1.0
    """Width multiplier of the backbone (MobileNetV2: 0.35, 0.5, 0.75, 1.0, 1.3, 1.4)."""
    size: int | None = None
    """Square input size in pixels; None = the backbone's default (224). Smaller is faster on the Pi."""
    weights: str = "imagenet"
    """Backbone initialisation: `imagenet` (Keras download), a local `.weights.h5` file, or `none`."""
    epochs: int = 30
    """Maximum epochs of stage 1 (head on cached features; cheap, early stopping usually ends it)."""
    fine_tune_epochs: int = 12
    """Maximum epochs of stage 2 (end-to-end fine-tuning of the top of the backbone; the slow stage)."""
    batch_size: int = 32
    """Images per step (both stages)."""
    learning_rate: float = 1e-3
    """Adam learning rate of stage 1."""
    fine_tune_learning_rate: float = 1e-4
    """Adam learning rate at the start of stage 2 (cosine decay to a tenth over `fine_tune_epochs`): lower
    than stage 1's, so the pretrained features are adjusted, not overwritten."""
    fine_tune_fraction: float = 0.3
    """Fraction of the backbone's layers (from the top) unfrozen in stage 2."""
    feature_copies: int = 8
    """Copies of each training image whose features stage 1 caches: 1 clean + (n-1) augmented."""
    dropout: float = 0.2
    """Dropout rate before the logits layer (training only)."""
    patience: int = 5
    """Stage 1: epochs without a better validation loss before it stops early."""
    fine_tune_patience: int = 3
    """Stage 2: epochs without a better validation loss before it stops early."""
    flip: bool = True
    """Augmentation: random horizontal flips (a mushroom has no handedness)."""
    rotation: float = 0.05
    """Augmentation: random rotation, as a fraction of a full turn (0.05 = +/-18 degrees)."""
    zoom: float = 0.2
    """Augmentation: random zoom-in of up to this fraction (a random crop, rescaled)."""
    brightness: float = 0.15
    """Augmentation: random brightness shift, fraction of the value range."""
    contrast: float = 0.2
    """Augmentation: random contrast factor range (1 +/- contrast)."""
    edible_penalty: float = 0.0
    """Weight of a second loss term, on photos whose class is not edible: -log(1 - p_edible), where
    p_edible is the probability the model puts on all edible classes together. Cross-entropy alone
    charges a fly agaric called "Caesar's mushroom" no more than one called "grisette"; this term
    charges the mistake that can end in EDIBLE (0 = plain cross-entropy)."""
    seed: int = 0
    """Seed of Python, NumPy and Keras random generators (keras.utils.set_random_seed)."""

    def validate(self) -> "HParams":
        """Raise ConfigError naming the first bad value."""
        checks = [
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.fine_tune_epochs >= 0, "--fine-tune-epochs must be >= 0"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.alpha > 0, "--alpha must be > 0"),
            (self.size is None or self.size >= 32, "--size must be >= 32 (the Keras MobileNets refuse less)"),
            (0.0 < self.fine_tune_fraction <= 1.0, "fine_tune_fraction must be in (0, 1]"),
            (self.feature_copies >= 1, "feature_copies must be >= 1"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.patience >= 1 and self.fine_tune_patience >= 1, "patience must be >= 1"),
            (self.learning_rate > 0 and self.fine_tune_learning_rate > 0, "learning rates must be > 0"),
            (self.edible_penalty >= 0.0, "--edible-penalty must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HParams":
        """Build from a dict (e.g. WORK/fit.json), ignoring keys this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
