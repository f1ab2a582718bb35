"""Backbones: each spec owns its default input size and the normalisation its weights expect.

The normalisation (`mean`, `std`) goes into the model card's `input` section, and the device applies it
with device.preprocess.normalize: x = (pixel - mean) / std. Keras's MobileNetV3 models rescale inside
the network (include_preprocessing=True), so their spec passes pixels through unchanged (mean 0, std 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device.errors import ConfigError

RESIZE_MODE = "center_crop"


@dataclass(frozen=True)
class ModelSpec:
    """One backbone: how to build it and what its input must look like."""

    name: str
    keras_name: str  # attribute of keras.applications
    default_size: int
    mean: float
    std: float
    extra: dict[str, Any] = field(default_factory=dict)  # further constructor arguments

    def input_dict(self, size: int | None = None) -> dict[str, Any]:
        """The card's `input` section before quantization (export adds dtype, scale and zero_point)."""
        s = int(size or self.default_size)
        return {"size": [s, s], "color": "RGB", "resize": RESIZE_MODE, "mean": self.mean, "std": self.std}

    def build_backbone(self, size: int, alpha: float, weights: str):
        """A headless Keras backbone with global average pooling, initialised from `weights`.

        `weights` is `imagenet` (Keras downloads the file), a path to a local `.weights.h5` holding
        exactly this backbone's variables, or `none` (random init). Raises ConfigError on a bad choice.
        """
        import keras

        ctor = getattr(keras.applications, self.keras_name)
        kwargs = dict(input_shape=(size, size, 3), alpha=alpha, include_top=False, pooling="avg", **self.extra)
        choice = str(weights)
        if choice.lower() == "imagenet":
            try:
                return ctor(weights="imagenet", **kwargs)
            except ValueError as e:  # e.g. an alpha with no published weights
                raise ConfigError(f"{self.name}: {_first_line(e)}") from None
            except Exception as e:  # keras raises a bare Exception when the download fails
                # The download error quotes the whole URL; the user needs the fix, not the URL.
                raise ConfigError(
                    f"no network: cannot download ImageNet weights for {self.name} ({type(e).__name__}); "
                    "pass --weights PATH (a local .weights.h5) or --weights none"
                ) from None
        base = ctor(weights=None, **kwargs)
        if choice.lower() == "none":
            return base
        path = Path(choice)
        if not path.is_file():
            raise ConfigError(f"--weights {choice}: no such file (use imagenet, none, or a .weights.h5 path)")
        if not path.name.endswith(".h5"):
            raise ConfigError(f"--weights {choice}: expected a Keras .weights.h5 file")
        try:
            base.load_weights(str(path))
        except (ValueError, OSError, KeyError) as e:
            raise ConfigError(
                f"--weights {path}: does not fit {self.name} alpha {alpha:g} ({_first_line(e)}); "
                "the file must hold this exact backbone's variables"
            ) from None
        return base


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


SPECS: dict[str, ModelSpec] = {
    # Keras's MobileNetV2 expects x / 127.5 - 1 (mobilenet_v2.preprocess_input).
    "mobilenet_v2": ModelSpec("mobilenet_v2", "MobileNetV2", 224, 127.5, 127.5),
    # MobileNetV3 rescales inside the model; its input is raw pixels 0..255.
    "mobilenet_v3_small": ModelSpec(
        "mobilenet_v3_small", "MobileNetV3Small", 224, 0.0, 1.0, {"include_preprocessing": True}
    ),
    "mobilenet_v3_large": ModelSpec(
        "mobilenet_v3_large", "MobileNetV3Large", 224, 0.0, 1.0, {"include_preprocessing": True}
    ),
}


def get_spec(name: str) -> ModelSpec:
    """The spec named `name`; an unknown name is a ConfigError listing the valid ones."""
    try:
        return SPECS[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; valid: {', '.join(SPECS)}") from None
