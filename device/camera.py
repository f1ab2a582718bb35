"""Cameras: where frames come from. Every camera gives an H x W x 3 uint8 RGB array per capture.

Pick one with a config string (see :func:`open_camera`): ``picamera2`` (the Pi camera), ``opencv:0``
or ``opencv:/dev/video0`` (a USB camera), or ``fake:PATH`` (image files, for a laptop and tests).
Frames are returned at the camera's own resolution: resizing and cropping to the model input belong
to ``device.preprocess``, the one path shared with training, so a camera never does its own.
"""

from __future__ import annotations

import glob
import logging
import time
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from device.errors import CameraError, ConfigError, ImageError
from device.preprocess import load_image

log = logging.getLogger("mushcam.camera")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


class Camera(ABC):
    """A source of RGB frames. Subclasses provide :meth:`capture` and :meth:`close`.

    Constructors take ``size``, the model's input size as (width, height), as a hint; a camera may
    use it for a preview stream but must still return full frames from :meth:`capture`.
    """

    @abstractmethod
    def capture(self) -> np.ndarray:
        """Take one frame: H x W x 3, uint8, RGB, C-contiguous. Raise CameraError if there is none."""

    @abstractmethod
    def close(self) -> None:
        """Release the camera; safe to call twice."""

    #: What a frame is recorded as coming from (a capture's result.json); the fake camera names its photo.
    source = "camera"
    press_sources: list[str] = []

    def capture_press(self, n: int) -> list[np.ndarray]:
        """The ``n`` frames of one button press; :attr:`press_sources` then says where each came from.

        A real camera takes ``n`` consecutive frames of the scene in front of it; the fake camera
        overrides this so that one press is one photo (a scene), not ``n`` different ones.
        """
        frames = [self.capture() for _ in range(n)]
        self.press_sources = [self.source] * n
        return frames

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _checked(frame: np.ndarray, where: str) -> np.ndarray:
    """``frame`` as the promised H x W x 3 uint8 C-contiguous array, or CameraError."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8 or 0 in frame.shape:
        raise CameraError(f"{where}: unexpected frame {frame.shape} {frame.dtype}; expected H x W x 3 uint8")
    return np.ascontiguousarray(frame)


def _find_images(source: str | Path) -> list[Path]:
    """The image files ``source`` names: a file, a folder (recursive) or a glob, sorted."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]  # named explicitly: trust it whatever its extension
    if path.is_dir():
        candidates = (p for p in path.rglob("*") if p.is_file())
    else:
        candidates = (Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    return sorted(
        p
        for p in candidates
        # Hidden files are editor and macOS leftovers ("._photo.jpg"), never photos.
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


class FakeCamera(Camera):
    """Frames from image files, for a laptop and tests; otherwise behaves like a real camera.

    ``source`` is a file, a folder (searched recursively) or a glob. Each capture decodes the next
    file in sorted order (``last_path`` says which), starting over at the end when ``loop`` is true
    and raising CameraError otherwise. ``size`` is accepted for parity with real cameras and ignored.

    :meth:`capture_press` takes all frames of one press from one photo (the next press moves to the
    next photo), as a real camera photographs one scene. With ``jitter`` (the default) every frame but
    the first is slightly cropped, maybe mirrored and brightened or darkened, so the frames differ as a
    real camera's do; the random generator is seeded (``seed``), so a run is repeatable.

    Faults for tests: ``fail_after=n`` makes every capture after the first ``n`` fail (a camera that
    died); :meth:`fail` makes the next ``n`` captures fail, then it recovers (a transient glitch).
    An injected failure does not consume a file; an undecodable file does (so a loop moves past it).
    """

    def __init__(
        self,
        source: str | Path,
        size: tuple[int, int] | None = None,
        loop: bool = True,
        fail_after: int | None = None,
        jitter: bool = True,
        seed: int = 0,
    ):
        self.source = str(source)
        self.paths = _find_images(source)
        if not self.paths:
            raise CameraError(
                f"fake camera: no images at {self.source} (a file, a folder or a glob of "
                f"{', '.join(IMAGE_EXTENSIONS)} files)"
            )
        self.loop = loop
        self.fail_after = fail_after
        self.captures = 0  # successful ones
        self.last_path: Path | None = None
        self._next = 0
        self._failures = 0
        self._closed = False
        self.jitter = jitter
        self._rng = np.random.default_rng(seed)
        self.press_sources: list[str] = []

    def fail(self, n: int = 1) -> None:
        """Make the next ``n`` captures raise CameraError."""
        self._failures = n

    def capture(self) -> np.ndarray:
        """The next photo, as it is on disk (never jittered: ``run --once`` classifies the photos themselves)."""
        self._check_faults()
        frame = self._next_photo()
        self.captures += 1
        return frame

    def capture_press(self, n: int) -> list[np.ndarray]:
        """``n`` frames of the next photo: the photo itself first, then jittered copies (if ``jitter``)."""
        frames: list[np.ndarray] = []
        photo = None
        for _ in range(n):
            self._check_faults()  # per frame, so fail_after=n still counts frames
            if photo is None:
                photo = self._next_photo()
                frames.append(photo)
            else:
                frames.append(self._jittered(photo) if self.jitter else photo.copy())
            self.captures += 1
        self.press_sources = [str(self.last_path)] * n
        return frames

    def _jittered(self, photo: np.ndarray) -> np.ndarray:
        """A copy a hand-held camera might have taken a moment later: up to 3 % cropped from each side,
        mirrored half the time, brightness within +-4 %. Small enough to keep the scene the same."""
        rng = self._rng
        h, w = photo.shape[:2]
        top, bottom, left, right = (int(rng.integers(0, max(1, int(side * 0.03)) + 1)) for side in (h, h, w, w))
        frame = photo[top : h - bottom, left : w - right]  # each side < 5 %: never empty
        if rng.random() < 0.5:
            frame = frame[:, ::-1]
        frame = np.clip(frame.astype(np.float32) * rng.uniform(0.96, 1.04), 0, 255).astype(np.uint8)
        return _checked(frame, f"fake camera ({self.last_path})")

    def _check_faults(self) -> None:
        if self._closed:
            raise CameraError("fake camera: capture after close()")
        if self._failures > 0:
            self._failures -= 1
            raise CameraError("fake camera: injected failure (FakeCamera.fail)")
        if self.fail_after is not None and self.captures >= self.fail_after:
            raise CameraError(f"fake camera: injected failure after {self.fail_after} frames (fail_after)")

    def _next_photo(self) -> np.ndarray:
        if self._next >= len(self.paths):
            if not self.loop:
                raise CameraError(f"fake camera: no more images in {self.source} (all {len(self.paths)} used)")
            self._next = 0
        path = self.last_path = self.paths[self._next]
        self._next += 1
        try:
            frame = load_image(path)
        except ImageError as e:
            raise CameraError(f"fake camera: cannot decode {path}: {e}") from e
        return _checked(frame, f"fake camera ({path})")

    def close(self) -> None:
        self._closed = True


class OpenCVCamera(Camera):
    """A USB (UVC) camera, or anything else OpenCV's VideoCapture opens, by index or path.

    ``size`` is ignored: a USB camera asked for 224x224 picks an odd mode; its default mode is
    captured and preprocessing crops and resizes. ``flush`` frames are grabbed and dropped before
    each capture because V4L2 queues frames: without it, a press would classify a frame taken
    before the press.
    """

    def __init__(self, device: int | str = 0, size: tuple[int, int] | None = None, flush: int = 2):
        try:
            import cv2
        except ImportError as e:
            raise CameraError(
                "OpenCV is not installed: pip install opencv-python-headless (or use picamera2 / fake:PATH)"
            ) from e
        self._cv2 = cv2
        self.device = device
        self.source = f"opencv:{device}"
        self.flush = flush
        self._capture = cv2.VideoCapture(device)
        if not self._capture.isOpened():
            self._capture.release()
            self._capture = None
            raise CameraError(f"cannot open camera opencv:{device}; is a USB camera plugged in? try opencv:1")
        # Keep the driver's queue short (not every backend honours it; flush covers the rest).
        self._capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)

    def capture(self) -> np.ndarray:
        if self._capture is None:
            raise CameraError(f"camera opencv:{self.device}: capture after close()")
        for _ in range(self.flush):
            self._capture.grab()
        ok, frame = self._capture.read()
        if not ok or frame is None:
            raise CameraError(f"camera opencv:{self.device} gave no frame; was it unplugged?")
        cv2 = self._cv2
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
        elif frame.shape[2] == 4:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
        else:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)  # OpenCV's frames are BGR
        return _checked(frame, f"camera opencv:{self.device}")

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


class PiCamera2Camera(Camera):
    """The Raspberry Pi camera through picamera2 (libcamera).

    Configures a ``main`` stream at ``main_size`` (1280x960: full field of view, binned, fast) and,
    when ``size`` (the model input, width x height) is given, a ``lores`` stream of that size, which
    a live preview or motion check can use cheaply. :meth:`capture` returns the main stream: the
    ISP's lores scaler stretches the whole frame to the model size, while the model was trained
    on center-cropped, PIL-resized photos, so feeding it lores would break train/serve parity.
    The camera runs between captures so exposure and white balance are settled at a press.
    """

    WARMUP_S = 1.0  # the first frames after start are dark or tinted while AE/AWB converge

    def __init__(
        self,
        size: tuple[int, int] | None = None,
        camera_num: int = 0,
        main_size: tuple[int, int] = (1280, 960),
    ):
        try:
            from picamera2 import Picamera2
        except ImportError as e:
            raise CameraError(
                "picamera2 is not installed: on a Pi `sudo apt install python3-picamera2` and make the "
                "venv with --system-site-packages"
            ) from e
        self._camera = None
        self.source = f"picamera2:{camera_num}"
        try:
            self._camera = Picamera2(camera_num)
            # "RGB888" is, despite its name, B,G,R byte order per pixel (libcamera's naming).
            main = {"size": tuple(main_size), "format": "RGB888"}
            # Lores must be YUV420 on a Pi 4 and no larger than main; even sides keep the ISP happy.
            lores = None
            if size:
                w, h = (min(max(2, int(v) // 2 * 2), m) for v, m in zip(size, main_size))
                lores = {"size": (w, h), "format": "YUV420"}
            config = self._camera.create_still_configuration(main=main, lores=lores, buffer_count=2)
            self._camera.configure(config)
            self._camera.start()
        except Exception as e:  # picamera2 raises IndexError, RuntimeError, ... for a missing/busy camera
            self.close()
            raise CameraError(
                f"cannot start Pi camera {camera_num} ({e}); check the ribbon cable, that no other program "
                "uses the camera, and `rpicam-hello --list-cameras`"
            ) from e
        self._started = time.monotonic()

    def capture(self) -> np.ndarray:
        if self._camera is None:
            raise CameraError("Pi camera: capture after close()")
        wait = self.WARMUP_S - (time.monotonic() - self._started)
        if wait > 0:
            time.sleep(wait)
        try:
            frame = self._camera.capture_array("main")
        except Exception as e:
            raise CameraError(f"Pi camera stopped delivering frames ({e}); check the ribbon cable") from e
        # B,G,R (RGB888) or B,G,R,X (XRGB8888) -> R,G,B
        frame = frame[..., 2::-1] if frame.ndim == 3 and frame.shape[2] in (3, 4) else frame
        return _checked(frame, "Pi camera")

    def close(self) -> None:
        if self._camera is not None:
            camera, self._camera = self._camera, None
            # Best effort: closing runs on shutdown and after failures, where raising helps nobody.
            for step in (camera.stop, camera.close):
                try:
                    step()
                except Exception as e:
                    log.warning("Pi camera %s failed: %s", step.__name__, e)


CAMERAS = {"fake": FakeCamera, "opencv": OpenCVCamera, "picamera2": PiCamera2Camera}


def parse_camera_spec(spec: str) -> tuple[str, str | int]:
    """Check a camera config string without opening anything: (kind, argument) or one ConfigError line.

    ``fake:PATH`` (file, folder or glob), ``opencv`` / ``opencv:INDEX`` / ``opencv:/dev/videoN``,
    ``picamera2`` / ``picamera2:N`` (N: camera number on a Pi with two cameras).
    """
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in CAMERAS:
        raise ConfigError(
            f"unknown camera {spec!r}; valid kinds: {', '.join(CAMERAS)} (fake:PATH, opencv:INDEX|PATH, picamera2[:N])"
        )
    if kind == "fake":
        if not arg:
            raise ConfigError("camera 'fake' needs a path: fake:PATH (an image, a folder or a glob)")
        return kind, arg
    arg = arg.strip()
    if kind == "opencv":  # a number, or anything OpenCV opens by name (a device path, a file)
        return kind, int(arg) if arg.isdigit() else (arg or 0)
    if arg and not arg.isdigit():
        raise ConfigError(f"camera {spec!r}: picamera2 takes a camera number (picamera2:1) or nothing")
    return kind, int(arg) if arg else 0


def open_camera(spec: str, size: tuple[int, int] | None = None, jitter: bool = True) -> Camera:
    """Open the camera a config string names (see parse_camera_spec); ``size`` is the model input (width, height).

    ``jitter`` is the fake camera's (see :class:`FakeCamera`); real cameras have their own.
    """
    kind, arg = parse_camera_spec(spec)
    if kind == "fake":
        return FakeCamera(arg, size=size, jitter=jitter)
    if kind == "opencv":
        return OpenCVCamera(arg, size=size)
    return PiCamera2Camera(size=size, camera_num=arg)
