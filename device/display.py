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
    ``confidence`` in [0, 1] or None to leave it out, and optional ``detail`` and ``note`` lines.

    ``press`` (the daemon's press number) and ``kind`` only name the PNG a laptop saves.
    """

    title: str
    verdict: str
    confidence: float | None = None
    detail: str = ""
    note: str = ""
    press: int | None = None
    kind: str = ""


# The reasons device.verdict gives, as they fit one 128 px line at 10 px (the full wording is in the
# log and in --json). A reason not listed is shown as it is when it fits, cut with "..." otherwise;
# tests/test_display.py checks that every reason verdict.py can give fits.
SHORT_REASONS = {
    "edible species, confident": "edible, confident",
    "poisonous species": "poisonous species",
    "no species is clearly ahead": "no clear leader",
    "not confident enough to call it edible": "too unsure for edible",
    "a poisonous look-alike is too likely": "toxic look-alike likely",
    "unlike the species it knows": "unlike species it knows",
    "not a species it knows": "not a species it knows",
    "no unknown-species score": "no familiarity score",
    "probabilities are not a distribution": "model output is invalid",
    "malformed probabilities": "model output is invalid",
}
# Reasons with a figure or a name in them (f-strings in verdict.py), by pattern.
SHORT_REASON_PATTERNS = (
    (re.compile(r"\d+ probabilities for \d+ labels"), "model/labels mismatch"),
    (re.compile(r"no edibility for label .*"), "card lacks an edibility"),
)


def short_reason(reason: str, width: int = 128, size: int = 10) -> str:
    """``reason`` worded to fit one display line of ``width`` px (see :data:`SHORT_REASONS`)."""
    text = SHORT_REASONS.get(reason)
    if text is None:
        text = next((short for pattern, short in SHORT_REASON_PATTERNS if pattern.fullmatch(reason)), reason)
    return _truncate(text, _font(size), width)


def percent(p: float) -> str:
    """A probability as the display writes it: rounded down, never "100%"."""
    return _confidence_text(p)


def name_with_percent(prefixes: tuple[str, ...], name: str, p: float, width: int = 128, size: int = 9) -> str:
    """ "looks like: grisette 44%": the first of ``prefixes`` with which the whole line fits ``width``
    at ``size`` px (9: the size of a verdict screen's third row); else the name is cut, never the figure."""
    font, tail = _font(size), f" {percent(p)}"
    for prefix in prefixes:
        if _width(prefix + name + tail, font) <= width:
            return prefix + name + tail
    prefix = prefixes[-1]
    return prefix + _truncate(name, font, width - _width(prefix + tail, font)).rstrip() + tail


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
    it, the title, the detail, the note, and at the bottom under a rule, always, the safety line. The
    verdict shrinks to fit, then like the other rows is cut with "..."; with all three rows the detail
    and note are drawn at 9 px; rows that do not fit the height are left out (note first, then
    detail), never the safety line.
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
    rows = [(screen.title, 11), (screen.detail, 10), (screen.note, 10)]
    rows = [(text, size) for text, size in rows if text]
    gap = 3
    if _rows_height(rows, gap) > bottom - y:
        # Three rows do not fit at 10-11 px on a 64 px screen; at 9 px with 2 px gaps they do.
        rows, gap = [(text, min(size, 9)) if i else (text, size) for i, (text, size) in enumerate(rows)], 2
    for text, size in rows:
        font = _font(size)
        row_height = _height("Ag", font)
        if y + row_height > bottom:
            break
        _draw(draw, (0, y), _truncate(text, font, width), font)
        y += row_height + gap
    return image


def _rows_height(rows, gap: int) -> int:
    return sum(_height("Ag", _font(size)) + gap for _, size in rows) - gap if rows else 0


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


FRAME_NAME = re.compile(r"frame-(\d+)(-[a-z0-9-]+)?\.png")


class PngDisplay(Display):
    """Saves every screen as a numbered PNG in ``folder``, for a laptop, named by press and screen:
    ``frame-000001-ready.png``, ``frame-000002-press0001-busy.png``, ``frame-000003-press0001-edible.png``.

    Rendering goes through luma's ``dummy`` device, as the OLED's would. Numbering continues after
    the frames already there, so a rerun never overwrites a previous run's pictures; only the newest
    ``keep`` frames are kept (oldest deleted), so a long laptop session cannot fill the disk.
    ``last_path`` is the most recent file.
    """

    def __init__(self, folder: str | os.PathLike, size: tuple[int, int] = (128, 64), keep: int = 200):
        from luma.core.device import dummy

        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HardwareError(f"cannot create the display folder {self.folder}: {e}") from e
        self.size = size
        self._device = dummy(width=size[0], height=size[1], mode="1")
        self.keep = max(1, keep)
        self._count = max((n for n, _ in self._frames()), default=0)
        self.last_path: Path | None = None

    @property
    def image(self) -> Image.Image:
        """What the display shows now."""
        return self._device.image

    def _frames(self) -> list[tuple[int, Path]]:
        """(number, path) of the frames in the folder, oldest first."""
        found = ((FRAME_NAME.fullmatch(p.name), p) for p in self.folder.glob("frame-*.png"))
        return sorted((int(m.group(1)), p) for m, p in found if m)

    def _name(self, screen: Screen) -> str:
        kind = screen.verdict.lower() if screen.kind in ("", "verdict") else screen.kind
        kind = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "screen"
        press = f"-press{screen.press:04d}" if screen.press is not None else ""
        return f"frame-{self._count:06d}{press}-{kind}.png"

    def show(self, screen: Screen) -> None:
        self._device.display(render(screen, self.size))
        self._count += 1
        path = self.folder / self._name(screen)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            self._device.image.save(tmp, format="PNG")
            os.replace(tmp, path)  # a viewer never sees a half-written file
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise HardwareError(f"cannot save the display frame {path}: {e}") from e
        self.last_path = path
        log.info("display: %s %s %s -> %s", screen.verdict, screen.title, _confidence_text(screen.confidence), path)
        for _, old in self._frames()[: -self.keep]:
            old.unlink(missing_ok=True)

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
