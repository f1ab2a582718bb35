"""device.preprocess: every kind of image a forager's phone, camera or file manager may hand us."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device.errors import BundleError, ImageError
from device.preprocess import (
    InputSpec,
    load_image,
    normalize,
    prepare_rgb,
    preprocess,
    quantize,
    resize,
)

SPEC = InputSpec((16, 16), "center_crop", 127.5, 127.5, "int8", 1 / 127.5, -1)
GOOD_INPUT = {"size": [16, 16], "resize": "center_crop", "mean": 127.5, "std": 127.5, "dtype": "int8",
              "scale": 0.0078125, "zero_point": -1, "color": "RGB"}


def assert_one_line_naming(err: Exception, name) -> None:
    msg = str(err)
    assert "\n" not in msg and str(name) in msg, msg


# --- InputSpec ------------------------------------------------------------------------------------------


def test_input_spec_round_trips_the_card_section():
    spec = InputSpec.from_dict(GOOD_INPUT)
    assert spec.size == (16, 16) and spec.dtype == "int8" and spec.zero_point == -1
    assert InputSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "change, words",
    [
        ({"size": None}, "input.size"),
        ({"size": [16]}, "input.size"),
        ({"size": [4, 16]}, "out of range"),
        ({"dtype": "float32"}, "full-integer"),
        ({"dtype": None}, "full-integer"),
        ({"resize": "crop"}, "input.resize"),
        ({"color": "BGR"}, "input.color"),
        ({"scale": None}, "non-numeric"),
        ({"std": 0}, "> 0"),
        ({"scale": -0.1}, "> 0"),
        ({"zero_point": 200}, "outside int8"),
        ({"dtype": "uint8", "zero_point": -1}, "outside uint8"),
    ],
)
def test_input_spec_refuses_a_bad_field_naming_it(change, words):
    d = {**GOOD_INPUT, **change}
    with pytest.raises(BundleError, match=words.replace(".", r"\.")) as e:
        InputSpec.from_dict(d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("missing", ["size", "scale", "zero_point"])
def test_input_spec_missing_key_is_named(missing):
    d = {k: v for k, v in GOOD_INPUT.items() if k != missing}
    with pytest.raises(BundleError, match=f"input.{missing}"):
        InputSpec.from_dict(d)


def test_input_spec_must_be_an_object():
    with pytest.raises(BundleError, match="must be an object"):
        InputSpec.from_dict([16, 16])


# --- undecodable input: one line naming the source, an ImageError, nothing else --------------------------


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match="empty") as e:
        load_image(p)
    assert_one_line_naming(e.value, p)


def test_empty_bytes():
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def test_truncated_jpeg(make_image, tmp_path):
    data = make_image("whole.jpg", size=(64, 64)).read_bytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated") as e:
        load_image(p, min_size=32)
    assert_one_line_naming(e.value, p)


def test_text_file(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("a fungus foray list, not a photo\n")
    with pytest.raises(ImageError, match="not an image") as e:
        load_image(p)
    assert_one_line_naming(e.value, p)


def test_decompression_bomb_is_refused_in_one_line(tmp_path):
    """A PNG header claiming 200000 x 200000 pixels: refused at open, before any memory is spent."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    p = tmp_path / "bomb.png"
    ihdr = struct.pack(">IIBBBBB", 200_000, 200_000, 8, 2, 0, 0, 0)
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    with pytest.raises(ImageError, match="too many pixels") as e:
        load_image(p, min_size=32)
    assert_one_line_naming(e.value, p)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="no such file") as e:
        load_image(tmp_path / "gone.jpg")
    assert_one_line_naming(e.value, tmp_path / "gone.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's TIFF reader warns about the damage it skips
def test_fuzzed_files_only_ever_raise_image_error(make_image):
    """Random truncations and byte flips of real files of each format: ImageError or a picture, nothing else."""
    rng = np.random.default_rng(0)
    bases = [make_image(f"base.{ext}", size=(24, 32)).read_bytes() for ext in ("jpg", "png", "gif", "bmp", "webp", "tif")]
    outcomes = {"ok": 0, "error": 0}
    for data in bases:
        for _ in range(60):
            d = bytearray(data)
            if rng.random() < 0.4:
                d = d[: int(rng.integers(1, len(d)))]
            else:
                for _ in range(int(rng.integers(1, 6))):
                    d[int(rng.integers(0, len(d)))] = int(rng.integers(0, 256))
            try:
                a = load_image(bytes(d), min_size=32)
            except ImageError as e:
                assert "\n" not in str(e)
                outcomes["error"] += 1
            else:
                assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
                outcomes["ok"] += 1
    assert outcomes["error"] > 50  # the loop really did produce broken files


# --- odd but valid images: decoded to the right RGB values ----------------------------------------------


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(p, quality=95)  # pure red in CMYK
    assert Image.open(p).mode == "CMYK"
    assert load_image(p).shape == (30, 40, 3)
    for a in (load_image(p), load_image(p, min_size=8)):  # the draft path too (it may halve the size)
        assert a.dtype == np.uint8 and a.ndim == 3 and min(a.shape[:2]) >= 8
        r, g, b = a.reshape(-1, 3).mean(axis=0)
        assert r > 240 and g < 15 and b < 15


def test_greyscale_16bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    a16 = np.tile(ramp, (8, 1))
    p = tmp_path / "grey16.png"
    Image.fromarray(a16).save(p)
    assert Image.open(p).mode.startswith("I")
    a = load_image(p)
    assert a.shape == (8, 256, 3) and a.dtype == np.uint8
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
    expected = np.round(ramp / 257.0).astype(int)
    assert np.abs(a[0, :, 0].astype(int) - expected).max() <= 1
    assert (a == 255).mean() < 0.01  # Pillow's own convert("RGB") would make almost everything white


def test_dark_16bit_png_stays_dark(tmp_path):
    """A 16-bit image's values are out of 65535 even when all are small: a night shot must not turn bright."""
    p = tmp_path / "dark16.png"
    Image.fromarray(np.full((8, 8), 200, np.uint16)).save(p)
    assert load_image(p).max() <= 1


def test_rgb_16bit_png_is_scaled(tmp_path, write_png16_rgb):
    a16 = np.zeros((6, 10, 3), np.uint16)
    a16[..., 0], a16[..., 1], a16[..., 2] = 40000, 1000, 65535
    p = write_png16_rgb(tmp_path / "rgb16.png", a16)
    a = load_image(p)
    assert a.shape == (6, 10, 3)
    assert np.abs(a[0, 0].astype(int) - np.round(np.array([40000, 1000, 65535]) / 257)).max() <= 1


def test_greyscale_jpeg_has_three_equal_channels(make_image):
    p = make_image("grey.jpg", mode="L")
    assert Image.open(p).mode == "L"
    a = load_image(p)
    assert a.shape == (48, 64, 3)
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])
    assert 60 < a.mean() < 120  # the red picture's luminance, not black or white


def test_rgba_transparent_becomes_white(tmp_path):
    a = np.zeros((10, 20, 4), np.uint8)
    a[..., :3] = (10, 200, 10)
    a[:, :10, 3] = 255  # left half opaque green, right half fully transparent
    a[:, 10:, 3] = 0
    p = tmp_path / "rgba.png"
    Image.fromarray(a, "RGBA").save(p)
    rgb = load_image(p)
    assert rgb.shape == (10, 20, 3)
    assert (rgb[:, :10] == (10, 200, 10)).all()
    assert (rgb[:, 10:] == 255).all()


def test_half_transparent_and_la_blend_onto_white(tmp_path):
    p = tmp_path / "half.png"
    Image.fromarray(np.dstack([np.zeros((4, 4, 3), np.uint8), np.full((4, 4), 128, np.uint8)]), "RGBA").save(p)
    assert np.abs(load_image(p).astype(int) - 127).max() <= 1
    la = tmp_path / "la.png"
    Image.fromarray(np.dstack([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)]), "LA").save(la)
    assert (load_image(la) == 255).all()


def test_palette_gif(make_image):
    p = make_image("pal.gif", colour="blue")
    assert Image.open(p).mode == "P"
    a = load_image(p)
    r, g, b = a.reshape(-1, 3).mean(axis=0)
    assert b > 150 and r < 80 and g < 90


def test_transparent_gif_becomes_white(tmp_path):
    img = Image.new("P", (20, 10), 0)
    img.putpalette([200, 30, 30, 0, 255, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (10, 0, 20, 10))  # right half: palette index 1, declared transparent below
    p = tmp_path / "transparent.gif"
    img.save(p, transparency=1)
    a = load_image(p)
    assert (a[:, :10] == (200, 30, 30)).all()
    assert (a[:, 10:] == 255).all()


def test_exif_orientation_6_is_rotated(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide, 20 high
    a[:5, :5] = (255, 0, 0)  # a red mark in the stored top-left corner
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / "rotated.jpg"
    img.save(p, exif=exif, quality=95)
    out = load_image(p)
    assert out.shape == (40, 20, 3)  # upright: taller than wide
    assert out[:4, -4:, 0].mean() > 200 and out[:4, :4, 0].mean() < 50  # the mark moved to the top-right
    small = load_image(p, min_size=8)  # the draft path rotates too
    assert small.shape[0] > small.shape[1]


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory) -> Path:
    """An 8000x6000 red JPEG (a phone's full-size photo), made quickly from a flat colour."""
    p = tmp_path_factory.mktemp("huge") / "huge.jpg"
    Image.new("RGB", (8000, 6000), (210, 40, 30)).save(p, quality=85)
    return p


def test_huge_jpeg_is_decoded_small_via_draft(huge_jpeg):
    a = load_image(huge_jpeg, min_size=32)
    # draft() scales by 1/8 at most: 1000 x 750 instead of 48 million pixels.
    assert a.shape[0] * a.shape[1] <= 1000 * 750
    assert min(a.shape[:2]) >= 32
    t = preprocess(huge_jpeg, SPEC)
    assert t.shape == (1, 16, 16, 3) and t.dtype == np.int8
    # prepare_rgb asks for the draft itself: same result as decoding small by hand.
    assert np.array_equal(prepare_rgb(huge_jpeg, SPEC), resize(load_image(huge_jpeg, min_size=32), (16, 16)))


def test_without_min_size_the_full_picture_is_decoded(tmp_path):
    # The control for the test above: it is draft, not the file, that makes the array small.
    p = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (210, 40, 30)).save(p, quality=85)
    assert load_image(p).shape == (3000, 4000, 3)


def test_without_min_size_a_48_mp_jpeg_is_refused(huge_jpeg):
    """Decoded whole, 48 MP would cost a Pi ~350 MB: one line instead."""
    with pytest.raises(ImageError, match="at most 12.2 MP for a JPEG decoded whole") as e:
        load_image(huge_jpeg)
    assert_one_line_naming(e.value, huge_jpeg)


# --- issue 12 item 10: images sized for a Pi ------------------------------------------------------------


def _png_header_only(path: Path, w: int, h: int, depth: int, colour_type: int) -> Path:
    """A PNG that declares w x h (its pixel data empty): the size check must refuse it before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("depth, colour_type", [(8, 2), (16, 2), (16, 0), (8, 3)], ids=["rgb8", "rgb16", "grey16", "palette"])
@pytest.mark.parametrize("min_size", [None, 448])
def test_a_10k_png_is_refused_in_one_line(tmp_path, depth, colour_type, min_size):
    """A 292 KB 10k x 10k PNG peaked at 1.0 GB RSS (16-bit grey: 2.6 GB): PNGs cannot be decoded small."""
    p = _png_header_only(tmp_path / "big.png", 10_000, 10_000, depth, colour_type)
    with pytest.raises(ImageError, match="10000x10000 is too many pixels to decode safely on a Pi") as e:
        load_image(p, min_size=min_size)
    assert "at most 12.2 MP for a PNG decoded whole" in str(e.value)
    assert_one_line_naming(e.value, p)


def test_a_big_progressive_jpeg_is_refused_even_with_min_size(tmp_path):
    """A progressive JPEG keeps all its coefficients however it is scaled (~9.5 bytes a pixel measured)."""
    p = tmp_path / "prog.jpg"
    Image.new("RGB", (4000, 3200), (210, 40, 30)).save(p, progressive=True, quality=80)
    with pytest.raises(ImageError, match="at most 12.2 MP for a progressive JPEG decoded whole"):
        load_image(p, min_size=448)


def test_webp_has_its_own_lower_budget(tmp_path):
    p = tmp_path / "big.webp"
    Image.new("RGB", (3000, 2100), (210, 40, 30)).save(p, quality=50)
    with pytest.raises(ImageError, match="at most 6 MP for a WEBP decoded whole"):
        load_image(p, min_size=448)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "1", "I;16"])
def test_big_non_jpeg_images_are_shrunk_before_conversion(tmp_path, mode):
    """With min_size, a PNG is box-shrunk right after decoding (both sides stay >= min_size)."""
    a = np.zeros((1000, 1200), np.uint16)
    a[:, 600:] = 65535 if mode == "I;16" else 255
    img = Image.fromarray(a) if mode == "I;16" else Image.fromarray(a.astype(np.uint8)).convert(mode)
    p = tmp_path / "big.png"
    img.save(p)
    out = load_image(p, min_size=300)
    assert out.shape[1:] == (400, 3) and out.shape[0] in (333, 334)  # factor 3 (Pillow keeps the partial row)
    assert out[:, :190].max() == 0 and out[:, 210:].min() == 255  # dark stays dark, white stays white


# --- arrays (camera frames) ------------------------------------------------------------------------------


def test_array_inputs():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert load_image(grey).shape == (3, 4, 3)
    assert load_image(grey[:, :, None]).shape == (3, 4, 3)
    rgba = np.zeros((3, 4, 4), np.uint8)
    assert load_image(rgba).shape == (3, 4, 3)
    assert (load_image(np.full((2, 2, 3), 65535, np.uint16)) == 255).all()
    assert (load_image(np.full((2, 2, 3), 300.0)) == 255).all()
    for bad in (np.zeros((3, 4, 2), np.uint8), np.zeros((0, 4, 3), np.uint8), np.zeros((2, 2, 2, 3), np.uint8)):
        with pytest.raises(ImageError, match="shape"):
            load_image(bad)


def test_every_source_kind_gives_the_same_tensor(make_image):
    p = make_image("same.png", colour="green")
    ref = preprocess(p, SPEC)
    assert np.array_equal(ref, preprocess(str(p), SPEC))
    assert np.array_equal(ref, preprocess(p.read_bytes(), SPEC))
    assert np.array_equal(ref, preprocess(Image.open(p), SPEC))
    assert np.array_equal(ref, preprocess(np.asarray(Image.open(p)), SPEC))


# --- resize, normalize, quantize ------------------------------------------------------------------------


def bands(width_each=10, height=10):
    """Three vertical bands: red | green | blue."""
    a = np.zeros((height, 3 * width_each, 3), np.uint8)
    a[:, :width_each] = (255, 0, 0)
    a[:, width_each : 2 * width_each] = (0, 255, 0)
    a[:, 2 * width_each :] = (0, 0, 255)
    return a


def test_center_crop_keeps_the_middle():
    out = resize(bands(), (8, 8), "center_crop")
    assert out.shape == (8, 8, 3)
    assert (out[:, 2:6] == (0, 255, 0)).all()  # the central green band fills the middle
    assert out[..., 0].max() < 255 and out[..., 2].max() < 255  # no pure red or blue band survives


def test_stretch_keeps_everything():
    out = resize(bands(), (8, 9), "stretch")
    assert out.shape == (8, 9, 3)
    assert (out[:, 0] == (255, 0, 0)).all() and (out[:, -1] == (0, 0, 255)).all()


def test_pad_letterboxes_with_black():
    wide = np.full((10, 40, 3), 200, np.uint8)
    out = resize(wide, (16, 16), "pad")
    assert out.shape == (16, 16, 3)
    assert (out[:6] == 0).all() and (out[-6:] == 0).all()  # 16 x 4 picture centred, black above and below
    assert (out[6:10] == 200).all()


def test_resize_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="center_crop"):
        resize(bands(), (8, 8), "fill")


def test_normalize_and_quantize_match_the_card_formula():
    px = np.array([[[0, 127, 255]]], np.uint8)
    x = normalize(px, SPEC)
    assert np.allclose(x, [-1.0, -0.003921, 1.0], atol=1e-5)
    q = quantize(x, SPEC)
    assert q.dtype == np.int8
    # q = round(x / scale) + zero_point, clipped to int8: -127.5 rounds to -128, then -1 -> clipped at -128.
    assert q.tolist() == [[[-128, -1, 126]]]
    u8 = InputSpec((16, 16), "stretch", 0.0, 255.0, "uint8", 1 / 255, 0)
    qu = quantize(normalize(px, u8), u8)
    assert qu.dtype == np.uint8 and qu.tolist() == [[[0, 127, 255]]]
    assert quantize(np.array([10.0, -10.0], np.float32), SPEC).tolist() == [127, -128]


def test_preprocess_shape_and_dtype(make_image):
    t = preprocess(make_image("p.jpg"), SPEC)
    assert t.shape == (1, 16, 16, 3) and t.dtype == np.int8
    # red picture: the red channel is high, the others low
    assert t[..., 0].mean() > 50 and t[..., 1].mean() < -50 and t[..., 2].mean() < -50


def test_bytes_source_error_says_bytes():
    with pytest.raises(ImageError, match="<bytes>"):
        load_image(io.BytesIO(b"nope").getvalue())


def test_a_95_megapixel_phone_jpeg_decodes_small_and_quietly(tmp_path, recwarn):
    """Past Pillow's 89 MP warning line: draft decoding keeps it small and nothing is printed."""
    p = tmp_path / "phone.jpg"
    Image.new("RGB", (10000, 9500), (120, 80, 40)).save(p, quality=50)
    rgb = load_image(p, min_size=448)
    assert rgb.shape[0] < 9500 // 4 and rgb.shape[1] < 10000 // 4
    assert not [w for w in recwarn.list if "DecompressionBomb" in type(w.message).__name__]


@pytest.mark.parametrize("mean,std,scale,zp,dtype", [(127.5, 127.5, 1 / 127.5, -1, "int8"), (0.0, 1.0, 1.0, -128, "int8"),
                                                      (0.0, 255.0, 1 / 255, 0, "uint8"), (100.0, 50.0, 0.037, 7, "int8")])
def test_the_fast_pixel_table_equals_the_float_path(mean, std, scale, zp, dtype):
    from device.preprocess import InputSpec, normalize, prepare_rgb, preprocess, quantize

    spec = InputSpec((24, 32), "center_crop", mean, std, dtype, scale, zp)
    rgb = np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    expected = quantize(normalize(prepare_rgb(rgb, spec), spec), spec)[None]
    got = preprocess(rgb, spec)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)
