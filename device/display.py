"""The small monochrome display: what a verdict looks like, and where it is shown.

:func:`render` turns a :class:`Screen` into a 1-bit PIL image. A :class:`Display` shows it: an
SSD1306/SH1106 OLED over I2C through luma.oled, PNG files on a laptop (luma's ``dummy`` device, the
same code path as the OLED), or nothing. Every screen carries a safety line; it is never truncated.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from device.errors import ConfigError, HardwareError

log = logging.getLogger("mushcam.display")

# Longest first; the first that fits the width is used. The short forms only matter on narrow
# displays or Pillow without FreeType (its fixed bitmap font is 6 px a character).
SAFETY_LINES = ("Never eat on this alone", "Never eat on this", "Don't eat on this")
ELLIPSIS = "..."


@dataclass(frozen=True)
class Screen:
    """One screenful: ``verdict`` big (e.g. "POISONOUS"), ``title`` (species display name),
    ``confidence`` in [0, 1] or None to leave it out, and an optional ``detail`` line."""

    title: str
    verdict: str
    confidence: float | None = None
    detail: str = ""


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``size`` px: no font file to ship or find on the Pi."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        # Pillow < 10.1 or without FreeType: one fixed-size bitmap font.
        return ImageFont.load_default()


def _bbox(text: str, font) -> tuple[int, int, int, int]:
    # Measure as drawn on a 1-bit image: monochrome glyphs are hinted wider than anti-aliased
    # ones (by 10-15 % for the default font), and measuring in "L" lets text run off the edge.
    try:
        return font.getbbox(text, mode="1")
    except TypeError:  # the bitmap fallback font takes no mode
        return font.getbbox(text)


def _width(text: str, font) -> int:
    """Pixels from x=0 to the right edge of ``text``'s ink when drawn at x=0."""
    return _bbox(text, font)[2]


def _truncate(text: str, font, width: int) -> str:
    """``text``, cut and ended with "..." if it is wider than ``width`` pixels."""
    if _width(text, font) <= width:
        return text
    while text and _width(text + ELLIPSIS, font) > width:
        text = text[:-1]
    return text.rstrip() + ELLIPSIS if text else ""


def _largest_fitting(text: str, width: int, sizes) -> tuple[int, object] | None:
    """The first (largest) of ``sizes`` at which ``text`` fits ``width``, with its font."""
    for size in sizes:
        font = _font(size)
        if _width(text, font) <= width:
            return size, font
    return None


def _confidence_text(confidence: float | None) -> str:
    if confidence is None or math.isnan(confidence):
        return ""
    # Round down and stop at 99: a model is never 100 % sure, and the screen must not claim it is.
    return f"{min(99, max(0, math.floor(confidence * 100)))}%"


def _height(text: str, font) -> int:
    _, top, _, bottom = _bbox(text, font)
    return bottom - top


def _draw(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font, bold: bool = False) -> None:
    """Draw ``text`` with the top of its ink at ``xy`` (fonts put blank space above their glyphs)."""
    x, y = xy
    _, top, _, _ = _bbox(text or "A", font)
    draw.text((x, y - top), text, font=font, fill=1)
    if bold and isinstance(font, ImageFont.FreeTypeFont):
        # Pillow's default font has no bold; a one-pixel offset reads well on a 1-bit OLED (but
        # smears the already heavy bitmap fallback font, so only for FreeType).
        draw.text((x + 1, y - top), text, font=font, fill=1)


def _safety_line(width: int, sizes: tuple[int, ...]) -> tuple[str, object]:
    """The longest safety wording that fits ``width`` at one of ``sizes`` (legible ones), and its font.

    Never truncated: a cut-off warning could read as a different one.
    """
    for line in SAFETY_LINES:
        fitted = _largest_fitting(line, width, sizes)
        if fitted:
            return line, fitted[1]
    return SAFETY_LINES[-1], _font(sizes[-1])


def render(screen: Screen, size: tuple[int, int] = (128, 64)) -> Image.Image:
    """Draw ``screen`` as a mode "1" image of ``size`` (width, height).

    Layout top to bottom: the verdict in big bold letters with the confidence right-aligned beside
    it, the title, the detail, and at the bottom under a rule, always, the safety line. The verdict
    shrinks to fit, then like the title and detail is cut with "..."; rows that do not fit the height
    are left out (detail first), never the safety line.
    """
    width, height = size
    tall = height >= 48
    image = Image.new("1", size, 0)
    draw = ImageDraw.Draw(image)

    line, safety_font = _safety_line(width, (10, 9, 8))
    safety_top = height - _height("Ag", safety_font)
    _draw(draw, (0, safety_top), line, safety_font)
    draw.line([(0, safety_top - 3), (width - 1, safety_top - 3)], fill=1)
    bottom = safety_top - 5  # rows above end here, leaving a gap above the rule

    confidence = _confidence_text(screen.confidence)
    conf_font = _font(11 if tall else 10)
    room = width - 1 - (_width(confidence, conf_font) + 4 if confidence else 0)  # -1: the fake bold
    sizes = (18, 16, 14, 12) if tall else (14, 12)
    verdict_font = (_largest_fitting(screen.verdict, room, sizes) or (0, _font(sizes[-1])))[1]
    _draw(draw, (0, 0), _truncate(screen.verdict, verdict_font, room), verdict_font, bold=True)
    verdict_height = _height("A", verdict_font)
    if confidence:
        x = width - _width(confidence, conf_font)
        _draw(draw, (x, verdict_height - _height(confidence, conf_font)), confidence, conf_font)

    y = verdict_height + 4
    for text, font in ((screen.title, _font(11)), (screen.detail, _font(10))):
        row_height = _height("Ag", font)
        if not text:
            continue
        if y + row_height > bottom:
            break
        _draw(draw, (0, y), _truncate(text, font, width), font)
        y += row_height + 3
    return image


class Display(ABC):
    """Somewhere a :class:`Screen` can be shown. Subclasses provide :meth:`show` and :meth:`close`."""

    size: tuple[int, int] = (128, 64)

    @abstractmethod
    def show(self, screen: Screen) -> None:
        """Render ``screen`` and put it on the display."""

    @abstractmethod
    def close(self) -> None:
        """Release the display; safe to call twice."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Ssd1306Display(Display):
    """An SSD1306 or SH1106 OLED on I2C ``port`` at ``address``, through luma.oled."""

    def __init__(
        self,
        port: int = 1,
        address: int = 0x3C,
        driver: str = "ssd1306",
        size: tuple[int, int] = (128, 64),
        rotate: int = 0,
    ):
        if driver not in ("ssd1306", "sh1106"):
            raise ConfigError(f"unknown OLED driver {driver!r}; valid: ssd1306, sh1106")
        where = f"I2C {port}:{address:#04x}"
        try:
            from luma.core.interface.serial import i2c
            from luma.oled import device as oled
        except ImportError as e:
            raise HardwareError(f"cannot drive the display at {where}: {e}; install luma.oled") from e
        try:
            serial = i2c(port=port, address=address)
            self._device = getattr(oled, driver)(serial, width=size[0], height=size[1], rotate=rotate)
        except Exception as e:  # luma raises its own errors, OSError, or smbus errors
            raise HardwareError(
                f"no display at {where} ({e}); check wiring / `i2cdetect -y {port}`"
            ) from e
        self.size = size

    def show(self, screen: Screen) -> None:
        try:
            self._device.display(render(screen, self.size))
        except OSError as e:
            raise HardwareError(f"display stopped answering ({e}); check its wiring") from e

    def close(self) -> None:
        """Blank the OLED (it would otherwise keep the last verdict forever) and release I2C."""
        if self._device is not None:
            try:
                self._device.cleanup()
            except OSError as e:
                log.warning("could not blank the display: %s", e)
            self._device = None


class PngDisplay(Display):
    """Saves every screen as a numbered PNG in ``folder`` (frame-000001.png, ...), for a laptop.

    Rendering goes through luma's ``dummy`` device, as the OLED's would. Numbering continues after
    the frames already there, so a rerun never overwrites a previous run's pictures. ``last_path`` is
    the most recent file.
    """

    def __init__(self, folder: str | os.PathLike, size: tuple[int, int] = (128, 64)):
        from luma.core.device import dummy

        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HardwareError(f"cannot create the display folder {self.folder}: {e}") from e
        self.size = size
        self._device = dummy(width=size[0], height=size[1], mode="1")
        numbers = [int(m.group(1)) for p in self.folder.glob("frame-*.png") if (m := re.fullmatch(r"frame-(\d+)\.png", p.name))]
        self._count = max(numbers, default=0)
        self.last_path: Path | None = None

    @property
    def image(self) -> Image.Image:
        """What the display shows now."""
        return self._device.image

    def show(self, screen: Screen) -> None:
        self._device.display(render(screen, self.size))
        self._count += 1
        path = self.folder / f"frame-{self._count:06d}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            self._device.image.save(tmp, format="PNG")
            os.replace(tmp, path)  # a viewer never sees a half-written file
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise HardwareError(f"cannot save the display frame {path}: {e}") from e
        self.last_path = path
        log.info("display: %s %s %s -> %s", screen.verdict, screen.title, _confidence_text(screen.confidence), path)

    def close(self) -> None:
        pass


class NullDisplay(Display):
    """No display: accepts screens and drops them (like picamera2's null preview)."""

    def __init__(self, **options):
        self.size = options.get("size", (128, 64))

    def show(self, screen: Screen) -> None:
        pass

    def close(self) -> None:
        pass


DISPLAYS = {
    "ssd1306": functools.partial(Ssd1306Display, driver="ssd1306"),
    "sh1106": functools.partial(Ssd1306Display, driver="sh1106"),
    "png": PngDisplay,
    "none": NullDisplay,
}


def open_display(kind: str, **options) -> Display:
    """Open the display named ``kind`` in :data:`DISPLAYS`, passing ``options`` to its constructor."""
    try:
        factory = DISPLAYS[kind]
    except KeyError:
        raise ConfigError(f"unknown display {kind!r}; valid: {', '.join(DISPLAYS)}") from None
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as e:
        raise ConfigError(f"bad options for display {kind!r}: {e}") from None
    return factory(**options)
