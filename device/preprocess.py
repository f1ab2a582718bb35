"""The one preprocessing path: decode -> RGB -> resize -> normalize -> quantize.

The daemon, `mushcam classify`, and the training toolchain's evaluation and calibration all call these
functions, so a photo becomes the same tensor on the workstation and on the Pi (train/serve parity).
The numbers come from the bundle's `input` section (see docs/model-bundle.md); nothing is hard-coded.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from device.errors import BundleError, ImageError

ImageSource = Union[str, os.PathLike, bytes, np.ndarray, Image.Image]

RESIZE_MODES = ("center_crop", "stretch", "pad")
INPUT_DTYPES = {"int8": np.int8, "uint8": np.uint8}

# Pillow's decompression-bomb check warns on stderr past 89 MP; load_image applies its own limits instead.
Image.MAX_IMAGE_PIXELS = None
_MAX_PIXELS = 100_000_000
_MAX_PIXELS_DRAFT = 400_000_000

# Transparent pixels become white, as the training photos were prepared.
_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class InputSpec:
    """The model's input contract, read from the card's `input` section."""

    size: tuple[int, int]  # (height, width)
    resize: str = "center_crop"
    mean: float = 127.5
    std: float = 127.5
    dtype: str = "int8"
    scale: float = 1 / 127.5
    zero_point: int = -1
    color: str = "RGB"

    @classmethod
    def from_dict(cls, d: Any) -> "InputSpec":
        """Validate a card's `input` section; raise BundleError naming the bad field."""
        if not isinstance(d, dict):
            raise BundleError("model.json: `input` must be an object")
        try:
            h, w = (int(v) for v in d["size"])
        except KeyError:
            raise BundleError("model.json: `input.size` is missing") from None
        except (TypeError, ValueError):
            raise BundleError(f"model.json: `input.size` must be [height, width], got {d['size']!r}") from None
        if not (8 <= h <= 4096 and 8 <= w <= 4096):
            raise BundleError(f"model.json: `input.size` {[h, w]} is out of range 8..4096")
        dtype = d.get("dtype")
        if dtype not in INPUT_DTYPES:
            raise BundleError(
                f"model.json: `input.dtype` is {dtype!r} but the bundle promises a full-integer model "
                f"(one of {', '.join(INPUT_DTYPES)}); re-export with mushcam-train export"
            )
        resize = d.get("resize", "center_crop")
        if resize not in RESIZE_MODES:
            raise BundleError(f"model.json: `input.resize` {resize!r} is not one of {', '.join(RESIZE_MODES)}")
        if d.get("color", "RGB") != "RGB":
            raise BundleError(f"model.json: `input.color` {d.get('color')!r} is not supported (only RGB)")
        try:
            mean, std, scale = float(d.get("mean", 0.0)), float(d.get("std", 1.0)), float(d["scale"])
            zero_point = int(d["zero_point"])
        except KeyError as e:
            raise BundleError(f"model.json: `input.{e.args[0]}` is missing (the int8 quantization)") from None
        except (TypeError, ValueError) as e:
            raise BundleError(f"model.json: `input` has a non-numeric value: {e}") from None
        if not (std > 0 and scale > 0):
            raise BundleError("model.json: `input.std` and `input.scale` must be > 0")
        info = np.iinfo(INPUT_DTYPES[dtype])
        if not info.min <= zero_point <= info.max:
            raise BundleError(f"model.json: `input.zero_point` {zero_point} is outside {dtype}")
        return cls((h, w), resize, mean, std, dtype, scale, zero_point)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        return d


def load_image(source: ImageSource, *, min_size: int | None = None) -> np.ndarray:
    """Decode any image into an H x W x 3 uint8 RGB array, upright.

    Handles EXIF orientation, greyscale, 16-bit, CMYK, palette and transparency (flattened onto white).
    `min_size` lets the JPEG decoder scale down by a power of two while both sides stay >= min_size:
    an 8000x6000 photo then never exists in memory at full size (the Pi has little RAM).
    Raises ImageError with one line naming the source.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        if isinstance(source, Image.Image):
            img = source
        elif isinstance(source, bytes):
            if not source:
                raise ImageError("<bytes>: empty image data")
            img = Image.open(io.BytesIO(source))
        else:
            path = Path(source)
            if path.is_dir():
                raise ImageError(f"{name}: is a folder, not an image")
            if path.exists() and path.stat().st_size == 0:
                raise ImageError(f"{name}: empty file (0 bytes)")
            img = Image.open(path)
        drafted = bool(min_size) and img.format == "JPEG"
        # Our own pixel limit replaces Pillow's: a JPEG decoded in draft mode is scaled down by up to 8x as
        # it is decoded, so a 108 MP phone photo is safe; anything else is decoded whole and stays capped.
        limit = _MAX_PIXELS_DRAFT if drafted else _MAX_PIXELS
        if img.width * img.height > limit:
            raise ImageError(f"{name}: {img.width}x{img.height} is too many pixels to decode safely; scale it down first")
        if drafted:
            img.draft("RGB", (min_size, min_size))
        img.load()  # decode now so a truncated file fails here, not later
        img = ImageOps.exif_transpose(img)
        return _pil_to_rgb(img)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image format mushcam can decode (use JPEG or PNG)") from None
    except (OSError, ValueError, SyntaxError) as e:
        # Pillow reports truncated or corrupt data as OSError/SyntaxError with a terse message.
        raise ImageError(f"{name}: corrupt or truncated image ({e})") from None


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit or 32-bit greyscale: Pillow's convert("RGB") would clip everything above 255 to white.
        a = np.asarray(img, dtype=np.float64)
        # I;16 is always out of 65535 (a dark 16-bit photo must stay dark); for 32-bit I/F, guess the range.
        top = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2))
    if mode == "P":
        img = img.convert("RGBA")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, _BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        img = canvas
    elif mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    """Accept camera frames and test arrays: HxW, HxWx1, HxWx3 or HxWx4 (alpha dropped)."""
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ImageError(f"image array has shape {a.shape}; expected H x W x 3")
    if a.dtype != np.uint8:
        if a.dtype == np.uint16:
            a = (a >> 8).astype(np.uint8)
        else:
            a = np.clip(a, 0, 255).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


# Downscales first average whole blocks of pixels (Image.reduce, in C, cheap), then resample the
# remainder bilinearly: a 1280x960 camera frame to 224x224 took 11.6 ms in one bilinear pass and 1.2 ms
# this way, a 640x480 frame 1.05 -> 0.66 ms (x86-64, medians). Training goes through this same function,
# so the model learns from exactly these pixels.
REDUCING_GAP = 1.0


def resize(rgb: np.ndarray, size: tuple[int, int], mode: str = "center_crop") -> np.ndarray:
    """Resize an RGB uint8 array to size=(height, width) by `mode` (center_crop, stretch or pad)."""
    h, w = size
    rgb = np.ascontiguousarray(rgb)
    src_h, src_w = rgb.shape[:2]
    # frombuffer shares the array's memory (fromarray copies a whole camera frame first).
    img = Image.frombuffer("RGB", (src_w, src_h), rgb, "raw", "RGB", 0, 1)
    if mode == "stretch":
        out = img.resize((w, h), Image.BILINEAR, reducing_gap=REDUCING_GAP)
    elif mode == "center_crop":
        # Crop the largest centred box with the target's aspect ratio, then scale it in one pass.
        target = w / h
        if src_w / src_h > target:
            cw, ch = src_h * target, float(src_h)
        else:
            cw, ch = float(src_w), src_w / target
        left, top = (src_w - cw) / 2, (src_h - ch) / 2
        out = img.resize((w, h), Image.BILINEAR, box=(left, top, left + cw, top + ch), reducing_gap=REDUCING_GAP)
    elif mode == "pad":
        s = min(w / src_w, h / src_h)
        nw, nh = max(1, round(src_w * s)), max(1, round(src_h * s))
        out = Image.new("RGB", (w, h), (0, 0, 0))
        out.paste(img.resize((nw, nh), Image.BILINEAR, reducing_gap=REDUCING_GAP), ((w - nw) // 2, (h - nh) // 2))
    else:
        raise ValueError(f"resize mode {mode!r} is not one of {', '.join(RESIZE_MODES)}")
    return np.asarray(out, dtype=np.uint8)


def normalize(rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Pixels -> the float values the Keras model was trained on: (x - mean) / std."""
    return (rgb.astype(np.float32) - np.float32(spec.mean)) / np.float32(spec.std)


def quantize(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Float model input -> the integer tensor the int8 model takes (the card's scale and zero point)."""
    dtype = INPUT_DTYPES[spec.dtype]
    info = np.iinfo(dtype)
    q = np.round(x / np.float32(spec.scale)) + spec.zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def prepare_rgb(image: ImageSource, spec: InputSpec) -> np.ndarray:
    """Decode and resize to the model's size: an (h, w, 3) uint8 array (what training caches)."""
    rgb = load_image(image, min_size=2 * max(spec.size))
    return resize(rgb, spec.size, spec.resize)


@functools.lru_cache(maxsize=8)
def _pixel_table(spec: InputSpec) -> np.ndarray:
    """quantize(normalize(p)) for every uint8 pixel value p: both steps act on each value alone, so a
    256-entry table gives exactly the same tensor, about 10x faster than the float arithmetic per frame."""
    return quantize(normalize(np.arange(256, dtype=np.uint8), spec), spec)


def to_tensor(rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A resized (h, w, 3) uint8 image -> the (1, h, w, 3) integer tensor; equal, value for value, to
    quantize(normalize(rgb, spec), spec)[None] (a test checks it)."""
    # np.take: the same lookup as table[rgb], about 3x faster on a 224x224x3 image.
    return np.take(_pixel_table(spec), rgb)[None]


def preprocess(image: ImageSource, spec: InputSpec) -> np.ndarray:
    """The whole path for one image: a (1, h, w, 3) tensor in the model's integer dtype."""
    return to_tensor(prepare_rgb(image, spec), spec)
