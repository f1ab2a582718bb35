"""device.display: rendering, PNG frames through luma's dummy device, the OLED path without I2C."""

import pytest
from PIL import Image, ImageDraw

from device import display as display_module
from device.display import (
    DISPLAYS,
    SAFETY_LINES,
    NullDisplay,
    PngDisplay,
    Screen,
    Ssd1306Display,
    open_display,
    render,
)
from device.errors import ConfigError, HardwareError

VERDICT_AREA = (0, 0, 100, 14)  # top-left: where the big verdict word is drawn
SAFETY_AREA = (0, 54, 128, 64)  # bottom: the safety line


def lit(image: Image.Image, box=None) -> int:
    """Number of lit pixels in ``box`` of a mode "1" image."""
    region = image.crop(box) if box else image
    return sum(region.histogram()[1:])


def text_image(text: str, size: int, bold: bool = False) -> Image.Image:
    """``text`` drawn alone as render() draws it, cropped to its ink, to compare with a screen."""
    image = Image.new("1", (256, 40))
    font = display_module._font(size)
    display_module._draw(ImageDraw.Draw(image), (0, 0), text, font, bold=bold)
    return image.crop(image.getbbox())


def contains(image: Image.Image, needle: Image.Image, y: int | None = None) -> bool:
    """True if ``needle`` appears pixel for pixel somewhere in ``image`` (or on row ``y``)."""
    rows = range(image.height - needle.height + 1) if y is None else [y]
    needle_bytes = needle.tobytes()
    for top in rows:
        for left in range(image.width - needle.width + 1):
            if image.crop((left, top, left + needle.width, top + needle.height)).tobytes() == needle_bytes:
                return True
    return False


@pytest.mark.parametrize("verdict", ["EDIBLE", "POISONOUS", "UNSURE"])
def test_render_each_verdict(verdict):
    image = render(Screen("Death cap (Amanita phalloides)", verdict, 0.87, "2nd: Paddy straw 8%"))
    assert image.mode == "1" and image.size == (128, 64)
    assert lit(image, VERDICT_AREA) > 80
    assert lit(image, SAFETY_AREA) > 40


def test_verdicts_look_different():
    images = [render(Screen("x", v, 0.5)).tobytes() for v in ("EDIBLE", "POISONOUS", "UNSURE")]
    assert len(set(images)) == 3


def test_the_whole_safety_line_is_drawn():
    image = render(Screen("A very long species name that cannot possibly fit", "POISONOUS", 0.5, "d" * 80))
    safety = text_image(SAFETY_LINES[0], 10)
    assert contains(image.crop(SAFETY_AREA), safety), "the safety line is missing or cut"


def test_long_text_is_cut_not_run_off_the_edge():
    image = render(Screen("W" * 60, "UNSURE", None, "M" * 60))
    for text, size in (("W" * 60, 11), ("M" * 60, 10)):
        cut = display_module._truncate(text, display_module._font(size), 128)
        assert cut.endswith("...") and len(cut) > 10
        # Drawn alone on a wide canvas, the cut text is complete inside the 128 px screen.
        assert contains(image, text_image(cut, size))


def test_verdict_shrinks_to_make_room_for_the_confidence():
    image = render(Screen("x", "POISONOUS", 0.97))
    assert contains(image, text_image("97%", 11))
    assert contains(image, text_image("POISONOUS", 16, bold=True))


@pytest.mark.parametrize("confidence, shown", [(0.999, "99%"), (0.5, "50%"), (0.004, "0%")])
def test_confidence_is_rounded_down_and_never_100(confidence, shown):
    assert display_module._confidence_text(confidence) == shown


def test_no_confidence_no_percent():
    assert display_module._confidence_text(None) == ""
    image = render(Screen("", "ERROR", None))
    assert lit(image, (110, 0, 128, 14)) == 0


def test_short_display_keeps_verdict_and_safety_line():
    image = render(Screen("Death cap", "POISONOUS", 0.9, "detail"), size=(128, 32))
    assert image.size == (128, 32)
    assert lit(image, (0, 0, 100, 10)) > 40
    assert contains(image, text_image(SAFETY_LINES[0], 10))


def test_narrow_display_uses_a_shorter_safety_wording():
    image = render(Screen("x", "UNSURE", None), size=(96, 64))
    assert contains(image, text_image(SAFETY_LINES[1], 10))


def test_png_display_saves_numbered_frames(tmp_path):
    folder = tmp_path / "screen"
    with PngDisplay(folder) as display:
        display.show(Screen("Chanterelle", "EDIBLE", 0.91))
        display.show(Screen("Death cap", "POISONOUS", 0.97, "2nd: Paddy straw 2%", press=7))
    assert sorted(p.name for p in folder.iterdir()) == ["frame-000001-edible.png", "frame-000002-press0007-poisonous.png"]
    assert display.last_path == folder / "frame-000002-press0007-poisonous.png"
    with Image.open(display.last_path) as image:
        assert image.size == (128, 64)
        image = image.convert("1")
        assert lit(image, VERDICT_AREA) > 80
        assert image.tobytes() == render(Screen("Death cap", "POISONOUS", 0.97, "2nd: Paddy straw 2%")).tobytes()


def test_png_display_never_overwrites_earlier_frames(tmp_path):
    (tmp_path / "frame-000007.png").write_bytes(b"from an earlier run")
    display = PngDisplay(tmp_path)
    display.show(Screen("x", "UNSURE", None, kind="ready"))
    assert display.last_path.name == "frame-000008-ready.png"
    assert (tmp_path / "frame-000007.png").read_bytes() == b"from an earlier run"
    assert not list(tmp_path.glob(".*.tmp"))


def test_png_display_unwritable_folder_is_a_hardware_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(HardwareError, match="display folder"):
        PngDisplay(blocker / "screen")


def test_oled_without_i2c_is_one_clear_line():
    # /dev/i2c-99 exists nowhere, so this is the real failure a Pi without I2C enabled gives.
    with pytest.raises(HardwareError, match=r"no display at I2C 99:0x3c .*i2cdetect -y 99"):
        Ssd1306Display(port=99)


@pytest.mark.parametrize("driver", ["ssd1306", "sh1106"])
def test_oled_driver_path_with_a_noop_bus(monkeypatch, driver):
    from luma.core.interface import serial

    opened = {}

    def fake_i2c(port, address):
        opened.update(port=port, address=address)
        return serial.noop()

    monkeypatch.setattr(serial, "i2c", fake_i2c)
    display = open_display(driver, port=3, address=0x3D)
    assert opened == {"port": 3, "address": 0x3D}
    assert type(display._device).__name__ == driver
    display.show(Screen("Chanterelle", "EDIBLE", 0.9))
    display.close()
    display.close()


def test_oled_unknown_driver():
    with pytest.raises(ConfigError, match="ssd1306, sh1106"):
        Ssd1306Display(driver="ili9341")


def test_registry_and_errors(tmp_path):
    assert set(DISPLAYS) == {"ssd1306", "sh1106", "png", "none"}
    with pytest.raises(ConfigError, match="valid: ssd1306, sh1106, png, none"):
        open_display("lcd")
    with pytest.raises(ConfigError, match="bad options for display 'png'"):
        open_display("png", folder=tmp_path, colour="red")
    with pytest.raises(ConfigError, match="bad options for display 'png'"):
        open_display("png")
    assert isinstance(open_display("png", folder=tmp_path), PngDisplay)


def test_null_display_accepts_anything():
    with open_display("none") as display:
        assert isinstance(display, NullDisplay)
        display.show(Screen("x", "EDIBLE", 1.0))


def test_without_freetype_the_bitmap_font_still_fits(monkeypatch):
    from PIL import ImageFont

    # Pillow built without FreeType has only its 6 px-wide bitmap font, whatever size is asked.
    monkeypatch.setattr(display_module, "_font", lambda size: ImageFont.load_default_imagefont())
    image = render(Screen("Death cap", "POISONOUS", 0.97, "detail"))
    assert contains(image, text_image(SAFETY_LINES[1], 10))  # the shorter wording: 102 px
    assert lit(image, VERDICT_AREA) > 40


def test_png_display_keeps_only_the_newest_frames(tmp_path):
    (tmp_path / "notes.txt").write_text("not a frame: left alone")
    display = PngDisplay(tmp_path, keep=3)
    for press in range(1, 6):
        display.show(Screen("x", "UNSURE", 0.5, press=press))
    assert sorted(p.name for p in tmp_path.glob("frame-*.png")) == [
        "frame-000003-press0003-unsure.png", "frame-000004-press0004-unsure.png", "frame-000005-press0005-unsure.png"]
    assert (tmp_path / "notes.txt").exists()


def _verdict_reasons() -> list[str]:
    """Every reason device/verdict.py can give: the strings passed to _unsure() and Decision(), read from
    its source so that a reason added later is checked too (f-string fields filled with typical values)."""
    import ast
    from pathlib import Path

    import device.verdict

    tree = ast.parse(Path(device.verdict.__file__).read_text())
    reasons = set()

    def text(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):
            return "".join(v.value if isinstance(v, ast.Constant) else "12" if "len" in ast.unparse(v) else "'amanita_caesarea'"
                           for v in node.values)
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            args = {"_unsure": node.args[:1], "Decision": node.args[5:6]}.get(node.func.id, [])
            reasons.update(t for t in map(text, args) if t)
        if isinstance(node, ast.Assign) and any("note" in ast.unparse(t) for t in node.targets):
            # ood_ok, ood_note = False, "..." : reasons handed on through a variable
            for t in ast.walk(node.value):
                if isinstance(t, ast.Constant) and isinstance(t.value, str) and t.value:
                    reasons.add(t.value)
    return sorted(reasons)


def test_every_verdict_reason_fits_the_display_without_dots():
    reasons = _verdict_reasons()
    assert "unlike the species it knows" in reasons and "not a species it knows" in reasons
    assert "edible species, confident" in reasons
    assert len(reasons) >= 10
    font = display_module._font(10)
    for reason in reasons:
        short = display_module.short_reason(reason)
        assert not short.endswith("..."), f"{reason!r} does not fit: {short!r}"
        assert display_module._width(short, font) <= 128, reason


def test_a_verdict_screen_with_three_rows_keeps_them_all():
    screen = Screen("Caesar's mushroom", "UNSURE", 0.62, "too unsure for edible", "looks like: grisette 31%")
    image = render(screen)
    for text in (screen.detail, screen.note):
        assert contains(image, text_image(text, 9)), text  # both rows drawn, whole, at 9 px
    assert contains(image, text_image("Caesar's mushroom", 11))
    assert contains(image.crop(SAFETY_AREA), text_image(SAFETY_LINES[0], 10))


def test_name_with_percent_shortens_the_prefix_then_the_name_never_the_figure():
    f = display_module.name_with_percent
    assert f(("looks like: ", "like: "), "grisette", 0.449) == "looks like: grisette 44%"
    assert f(("looks like: ", "like: "), "scarletina bolete", 0.3) == "like: scarletina bolete 30%"
    cut = f(("2nd: ",), "a species with a very long name indeed", 0.071)
    assert cut.startswith("2nd: a species") and cut.endswith("... 7%")
    assert display_module._width(cut, display_module._font(9)) <= 128
