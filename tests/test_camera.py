"""device.camera: the fake camera on real image files, OpenCV on real image sequences, picamera2 faked."""

import sys
import types

import numpy as np
import pytest
from PIL import Image

from device import camera as camera_module
from device.camera import (
    CAMERAS,
    FakeCamera,
    OpenCVCamera,
    PiCamera2Camera,
    open_camera,
)
from device.errors import CameraError, ConfigError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def write_image(path, colour, size=(12, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def photos(tmp_path):
    """A folder like a forager's: nested, mixed case, with non-images and hidden junk."""
    root = tmp_path / "photos"
    write_image(root / "b_green.png", GREEN)
    write_image(root / "a_red.png", RED)
    write_image(root / "sub" / "c_blue.PNG", BLUE)
    write_image(root / "sub" / "d_red.jpg", RED, size=(16, 16))
    (root / "notes.txt").write_text("not a photo")
    (root / "._a_red.png").write_bytes(b"macOS resource fork")
    return root


def assert_colour(frame, colour, tolerance=0):
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
    assert frame.flags["C_CONTIGUOUS"]
    assert np.abs(frame.astype(int) - colour).max() <= tolerance, frame[0, 0]


def test_fake_camera_cycles_through_a_folder_in_order(photos):
    with FakeCamera(photos) as camera:
        assert [p.name for p in camera.paths] == ["a_red.png", "b_green.png", "c_blue.PNG", "d_red.jpg"]
        assert_colour(camera.capture(), RED)
        assert camera.last_path.name == "a_red.png"
        assert_colour(camera.capture(), GREEN)
        assert_colour(camera.capture(), BLUE)
        frame = camera.capture()
        assert frame.shape == (16, 16, 3)
        assert_colour(frame, RED, tolerance=8)  # JPEG
        assert_colour(camera.capture(), RED)  # looped
        assert camera.last_path.name == "a_red.png"


def test_fake_camera_single_file_and_glob(photos):
    assert FakeCamera(photos / "b_green.png").paths == [photos / "b_green.png"]
    camera = FakeCamera(str(photos / "**" / "*_red.*"))
    assert [p.name for p in camera.paths] == ["a_red.png", "d_red.jpg"]


def test_fake_camera_without_loop_runs_out(photos):
    camera = FakeCamera(photos / "sub", loop=False)
    camera.capture()
    camera.capture()
    with pytest.raises(CameraError, match="no more images"):
        camera.capture()


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_fake_camera_with_nothing_to_show(tmp_path, where):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(CameraError, match=f"no images at .*{where}"):
        FakeCamera(tmp_path / where)


def test_fake_camera_names_an_undecodable_file_and_moves_on(photos):
    (photos / "a_red.png").write_bytes(b"\x89PNG truncated")
    camera = FakeCamera(photos)
    with pytest.raises(CameraError, match="cannot decode .*a_red.png"):
        camera.capture()
    assert camera.last_path.name == "a_red.png"
    assert_colour(camera.capture(), GREEN)


def test_fake_camera_transient_failures(photos):
    camera = FakeCamera(photos)
    camera.fail(2)
    for _ in range(2):
        with pytest.raises(CameraError, match="injected failure"):
            camera.capture()
    assert_colour(camera.capture(), RED)  # the failures did not use up a file


def test_fake_camera_dies_after_n_frames(photos):
    camera = FakeCamera(photos, fail_after=2)
    camera.capture()
    camera.capture()
    for _ in range(3):
        with pytest.raises(CameraError, match="after 2 frames"):
            camera.capture()


def test_fake_camera_close_twice_then_capture_fails(photos):
    camera = FakeCamera(photos, size=(224, 224))
    camera.close()
    camera.close()
    with pytest.raises(CameraError, match="after close"):
        camera.capture()


def test_camera_error_is_one_line_and_an_oserror(tmp_path):
    with pytest.raises(OSError) as info:
        FakeCamera(tmp_path / "nothing")
    assert "\n" not in str(info.value)


def test_opencv_converts_bgr_to_rgb_and_flushes_stale_frames(tmp_path):
    # OpenCV opens a printf-style file pattern as a "camera": a real VideoCapture, no device needed.
    write_image(tmp_path / "f00.png", RED)
    write_image(tmp_path / "f01.png", BLUE)
    write_image(tmp_path / "f02.png", GREEN)
    with OpenCVCamera(str(tmp_path / "f%02d.png"), flush=1) as camera:
        assert_colour(camera.capture(), BLUE)  # f00 was dropped as stale
        with pytest.raises(CameraError, match="gave no frame"):
            camera.capture()  # f02 dropped, then nothing left: like an unplugged camera


def test_opencv_without_flush_reads_every_frame(tmp_path):
    write_image(tmp_path / "f00.png", RED)
    write_image(tmp_path / "f01.png", GREEN)
    camera = OpenCVCamera(str(tmp_path / "f%02d.png"), flush=0)
    assert_colour(camera.capture(), RED)
    assert_colour(camera.capture(), GREEN)
    camera.close()
    camera.close()
    with pytest.raises(CameraError, match="after close"):
        camera.capture()


def test_opencv_missing_device_says_what_to_try(tmp_path):
    with pytest.raises(CameraError, match=r"opencv:/dev/video99; is a USB camera plugged in\? try opencv:1"):
        OpenCVCamera("/dev/video99")


class FakePicamera2:
    """Stands in for picamera2.Picamera2: records configuration, returns a B,G,R(,X) frame."""

    instances = []
    frame_format = "RGB888"

    def __init__(self, camera_num=0):
        self.camera_num = camera_num
        self.calls = []
        FakePicamera2.instances.append(self)

    def create_still_configuration(self, main=None, lores=None, **kwargs):
        self.calls.append(("create_still_configuration", main, lores, kwargs))
        return {"main": main, "lores": lores}

    def configure(self, config):
        self.calls.append(("configure", config))

    def start(self):
        self.calls.append(("start",))

    def capture_array(self, name="main"):
        self.calls.append(("capture_array", name))
        w, h = 6, 4
        pixel = [30, 20, 10] + ([255] if self.frame_format == "XRGB8888" else [])  # B, G, R(, X)
        return np.tile(np.array(pixel, np.uint8), (h, w, 1))

    def stop(self):
        self.calls.append(("stop",))

    def close(self):
        self.calls.append(("close",))


@pytest.fixture
def picamera2(monkeypatch):
    module = types.ModuleType("picamera2")
    module.Picamera2 = FakePicamera2
    FakePicamera2.instances = []
    monkeypatch.setitem(sys.modules, "picamera2", module)
    monkeypatch.setattr(PiCamera2Camera, "WARMUP_S", 0.0)
    return module


@pytest.mark.parametrize("frame_format", ["RGB888", "XRGB8888"])
def test_picamera2_returns_rgb(picamera2, monkeypatch, frame_format):
    monkeypatch.setattr(FakePicamera2, "frame_format", frame_format)
    with PiCamera2Camera(size=(224, 224)) as camera:
        frame = camera.capture()
    assert frame.shape == (4, 6, 3) and frame.flags["C_CONTIGUOUS"]
    assert frame[0, 0].tolist() == [10, 20, 30]


def test_picamera2_streams_main_and_lores(picamera2):
    camera = PiCamera2Camera(size=(225, 160), camera_num=1)
    camera.capture()
    camera.close()
    camera.close()
    fake = FakePicamera2.instances[0]
    assert fake.camera_num == 1
    name, main, lores, _ = fake.calls[0]
    assert name == "create_still_configuration"
    assert main == {"size": (1280, 960), "format": "RGB888"}
    assert lores == {"size": (224, 160), "format": "YUV420"}  # even sides
    assert [c[0] for c in fake.calls[1:]] == ["configure", "start", "capture_array", "stop", "close"]
    assert ("capture_array", "main") in fake.calls


def test_picamera2_without_size_has_no_lores(picamera2):
    PiCamera2Camera().close()
    assert FakePicamera2.instances[0].calls[0][2] is None


def test_picamera2_start_failure_is_a_camera_error(picamera2, monkeypatch):
    def busy(self):
        raise RuntimeError("Failed to acquire camera: Device or resource busy")

    monkeypatch.setattr(FakePicamera2, "start", busy)
    with pytest.raises(CameraError, match="Device or resource busy.*rpicam-hello --list-cameras"):
        PiCamera2Camera()
    assert FakePicamera2.instances[0].calls[-1] == ("close",)  # released for the next attempt


def test_picamera2_not_installed(monkeypatch):
    # None in sys.modules makes `import picamera2` raise a real ImportError, installed or not.
    monkeypatch.setitem(sys.modules, "picamera2", None)
    with pytest.raises(CameraError) as info:
        PiCamera2Camera()
    assert str(info.value) == (
        "picamera2 is not installed: on a Pi `sudo apt install python3-picamera2` and make the venv "
        "with --system-site-packages"
    )


def test_open_camera_specs(photos, picamera2, monkeypatch, tmp_path):
    assert set(CAMERAS) == {"fake", "opencv", "picamera2"}
    camera = open_camera(f"fake:{photos}", size=(224, 224))
    assert isinstance(camera, FakeCamera) and len(camera.paths) == 4

    opened = []
    monkeypatch.setattr(camera_module, "OpenCVCamera", lambda device, size: opened.append(device))
    open_camera("opencv")
    open_camera("opencv:1")
    open_camera("opencv:/dev/video0")
    assert opened == [0, 1, "/dev/video0"]

    assert isinstance(open_camera("picamera2"), PiCamera2Camera)
    open_camera("picamera2:1")
    assert [c.camera_num for c in FakePicamera2.instances] == [0, 1]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("webcam", "unknown camera 'webcam'; valid kinds: fake, opencv, picamera2"),
        ("fake", "fake:PATH"),
        ("fake:", "fake:PATH"),
        ("picamera2:front", "picamera2 takes a camera number"),
    ],
)
def test_open_camera_bad_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        open_camera(spec)


@pytest.fixture
def scenes(tmp_path, rgb_array):
    """Two noisy photos big enough for the jitter's crop to show."""
    root = tmp_path / "scenes"
    root.mkdir()
    for i, colour in enumerate(("red", "blue")):
        Image.fromarray(rgb_array(colour, size=(60, 80), seed=i)).save(root / f"{i}_{colour}.png")
    return root


def test_fake_camera_one_press_is_one_photo_and_the_next_press_the_next(scenes):
    with FakeCamera(scenes, seed=3) as camera:
        first = camera.capture_press(3)
        assert camera.press_sources == [str(scenes / "0_red.png")] * 3
        second = camera.capture_press(3)
        assert camera.press_sources == [str(scenes / "1_blue.png")] * 3
        camera.capture_press(2)
        assert camera.press_sources == [str(scenes / "0_red.png")] * 2  # looped
    photo = np.asarray(Image.open(scenes / "0_red.png"))
    assert np.array_equal(first[0], photo)  # the first frame is the photo itself
    assert len({f.tobytes() for f in first}) == 3  # jittered: no two frames alike, as a real camera's
    for frame in first[1:]:
        assert frame.dtype == np.uint8 and frame.flags["C_CONTIGUOUS"]
        assert 0.94 * 60 <= frame.shape[0] <= 60 and 0.94 * 80 <= frame.shape[1] <= 80  # at most 3 % a side
        assert abs(frame.mean() - photo.mean()) < 0.06 * photo.mean()  # same scene, a little brighter or darker
    assert second[1].mean(axis=(0, 1)).argmax() == 2  # still the blue photo


def test_fake_camera_jitter_is_seeded_and_can_be_turned_off(scenes):
    a, b = FakeCamera(scenes, seed=5).capture_press(3), FakeCamera(scenes, seed=5).capture_press(3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # a rerun is repeatable
    still = FakeCamera(scenes, jitter=False).capture_press(3)
    assert all(np.array_equal(f, still[0]) for f in still)
    assert open_camera(f"fake:{scenes}", jitter=False).jitter is False


def test_fake_camera_press_faults_count_frames(scenes):
    camera = FakeCamera(scenes, fail_after=4)
    camera.capture_press(3)
    with pytest.raises(CameraError, match="after 4 frames"):
        camera.capture_press(3)  # dies in the middle of the second press


def test_real_cameras_take_a_press_as_consecutive_frames(tmp_path):
    for i, colour in enumerate((RED, BLUE, GREEN)):
        write_image(tmp_path / f"f{i:02d}.png", colour)
    with OpenCVCamera(str(tmp_path / "f%02d.png"), flush=0) as camera:
        frames = camera.capture_press(3)
        assert [tuple(f[0, 0]) for f in frames] == [RED, BLUE, GREEN]
        assert camera.press_sources == [f"opencv:{tmp_path / 'f%02d.png'}"] * 3
