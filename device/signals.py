"""LEDs and the shutter button, through gpiozero.

There is no fake GPIO here on purpose: gpiozero's ``MockFactory`` is a complete simulated board.
On a laptop, :func:`use_mock_pins` installs it, LED changes show up in the log, and a test or the
daemon presses the button with ``factory.pin(5).drive_low()`` / ``drive_high()``.

Wiring (BCM numbers, see docs/wiring.md): green LED 17, red LED 27, amber LED 22, button 5 to GND.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable, Mapping

import gpiozero
from gpiozero.pins.mock import MockFactory

from device.errors import ConfigError, HardwareError

log = logging.getLogger("mushcam.signals")

VERDICTS = ("EDIBLE", "POISONOUS", "UNSURE")
LED_NAMES = ("green", "red", "amber")
DEFAULT_PINS = {"green": 17, "red": 27, "amber": 22, "button": 5}

# What each state means on the LEDs, for the log line a laptop run shows instead of lights.
DESCRIPTIONS = {
    "EDIBLE": "green solid",
    "POISONOUS": "red solid",
    "UNSURE": "amber solid",
    "busy": "amber blinking",
    "error": "red+amber blinking fast",
    "off": "all off",
}


class Signals:
    """What the forager sees on the LEDs: a verdict, "working", "something is wrong", or nothing.

    Subclasses provide :meth:`_apply` (make the hardware show a state from :data:`DESCRIPTIONS`) and
    may extend :meth:`close`. This base class validates, logs and remembers the state, so it is also
    a usable do-nothing implementation for a device without LEDs.
    """

    def __init__(self) -> None:
        self.state = "off"

    def show(self, verdict: str) -> None:
        """Show a verdict: "EDIBLE", "POISONOUS" or "UNSURE".

        Anything else is a bug in the caller, and guessing could light the green LED, so it raises.
        """
        if verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {verdict!r}; expected one of {', '.join(VERDICTS)}")
        self._change(verdict)

    def busy(self) -> None:
        """A photo is being taken and classified."""
        self._change("busy")

    def error(self) -> None:
        """Something failed (camera, model); no verdict is available."""
        self._change("error")

    def off(self) -> None:
        """All LEDs off."""
        self._change("off")

    def close(self) -> None:
        """Turn everything off and release the hardware; safe to call twice."""
        self.state = "off"

    def _change(self, state: str) -> None:
        log.info("LEDs: %s (%s)", state, DESCRIPTIONS[state])
        self._apply(state)
        self.state = state

    def _apply(self, state: str) -> None:
        """Make the hardware show ``state``; the base class has no hardware."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _open(what: str, pin, make: Callable):
    """Build a gpiozero device, turning its many exceptions into one HardwareError line."""
    try:
        return make()
    except gpiozero.BadPinFactory as e:
        raise HardwareError(
            f"cannot open GPIO{pin} for the {what}: no GPIO library found ({e}); "
            "on a Pi install python3-lgpio, elsewhere run in laptop mode (mock pins)"
        ) from e
    except gpiozero.GPIOPinInUse as e:
        raise HardwareError(
            f"cannot open GPIO{pin} for the {what}: pin in use ({e}); "
            "is another mushcam running, or two parts configured on one pin?"
        ) from e
    except (gpiozero.GPIOZeroError, OSError, ValueError) as e:
        raise HardwareError(f"cannot open GPIO{pin} for the {what}: {e}; check the pin number in the config") from e


class GpioSignals(Signals):
    """Three LEDs on GPIO pins: green = EDIBLE, red = POISONOUS, amber = UNSURE.

    ``pins`` maps "green", "red" and "amber" to BCM numbers (other keys such as "button" are
    ignored, so the config's whole pin table can be passed). ``pin_factory`` defaults to gpiozero's
    global one. Blink half-periods are in seconds.
    """

    def __init__(
        self,
        pins: Mapping[str, int] | None = None,
        pin_factory=None,
        *,
        busy_blink: float = 0.5,
        error_blink: float = 0.1,
    ):
        super().__init__()
        pins = DEFAULT_PINS if pins is None else pins
        missing = [name for name in LED_NAMES if name not in pins]
        if missing:
            raise ConfigError(f"LED pins missing for {', '.join(missing)}; set pins {', '.join(LED_NAMES)}")
        self.busy_blink = busy_blink
        self.error_blink = error_blink
        self.leds: dict[str, gpiozero.LED] = {}
        try:
            for name in LED_NAMES:
                self.leds[name] = _open(
                    f"{name} LED", pins[name], lambda: gpiozero.LED(pins[name], pin_factory=pin_factory)
                )
        except HardwareError:
            # Release the LEDs already opened, so a retry (or another process) can have them.
            self.close()
            raise

    def _apply(self, state: str) -> None:
        for led in self.leds.values():
            led.off()  # also stops any blinking thread
        if state in VERDICTS:
            colour = {"EDIBLE": "green", "POISONOUS": "red", "UNSURE": "amber"}[state]
            self.leds[colour].on()
        elif state == "busy":
            self.leds["amber"].blink(self.busy_blink, self.busy_blink)
        elif state == "error":
            self.leds["red"].blink(self.error_blink, self.error_blink)
            self.leds["amber"].blink(self.error_blink, self.error_blink)

    def close(self) -> None:
        """Turn the LEDs off and release their pins; safe to call twice."""
        for led in self.leds.values():
            # Off first: close() only turns the pin into an input, and some pin libraries leave the
            # last level latched, so a verdict could stay lit after the service stopped.
            led.off()
            led.close()
        self.leds = {}
        super().close()


class Button:
    """The shutter button: a push button between a GPIO pin and GND, using the internal pull-up.

    ``when_pressed`` is called with no arguments once per press, from gpiozero's event thread.
    Presses closer than ``bounce_time`` seconds to the previous edge (press or release) are contact
    bounce and ignored. The pin library's own debounce is also requested, but we debounce in software
    too because not every pin factory implements it (MockFactory ignores it) and a bounce on
    *release* would otherwise read as a second press: two photos for one push.
    """

    def __init__(
        self,
        pin: int = DEFAULT_PINS["button"],
        *,
        bounce_time: float = 0.05,
        when_pressed: Callable[[], None] | None = None,
        pin_factory=None,
    ):
        self.pin = pin
        self.bounce_time = bounce_time
        self.when_pressed = when_pressed
        self.presses = 0
        self._last_edge = float("-inf")
        self._pressed = threading.Event()
        self._button = _open(
            "button",
            pin,
            lambda: gpiozero.Button(pin, pull_up=True, bounce_time=bounce_time, pin_factory=pin_factory),
        )
        self._button.when_pressed = self._on_press
        self._button.when_released = self._on_release

    @property
    def is_pressed(self) -> bool:
        """True while the button is held down."""
        return self._button is not None and self._button.is_pressed

    def wait_for_press(self, timeout: float | None = None) -> bool:
        """Block until a (debounced) press or ``timeout`` seconds; True if there was a press.

        Lets a main loop wait for the button and still wake up to ping the watchdog.
        """
        pressed = self._pressed.wait(timeout)
        self._pressed.clear()
        return pressed

    def _debounced(self) -> bool:
        now = time.monotonic()
        quiet = now - self._last_edge >= self.bounce_time
        self._last_edge = now
        return quiet

    def _on_release(self) -> None:
        self._debounced()

    def _on_press(self) -> None:
        if not self._debounced():
            return
        self.presses += 1
        log.info("button on GPIO%s pressed", self.pin)
        self._pressed.set()
        if self.when_pressed is not None:
            try:
                self.when_pressed()
            except Exception:
                # This runs in gpiozero's thread: an uncaught error would silently kill the button.
                log.exception("button handler failed")

    def close(self) -> None:
        """Release the pin; safe to call twice."""
        if self._button is not None:
            self._button.close()
            self._button = None

    def __enter__(self) -> Button:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def use_mock_pins(force: bool = False):
    """Make sure gpiozero has a pin factory, falling back to ``MockFactory``; return the factory.

    Keeps a factory that is already installed; otherwise tries gpiozero's real ones (lgpio, RPi.GPIO,
    ...) and installs a ``MockFactory`` when none works (a laptop). ``force=True`` always installs a
    fresh ``MockFactory``. Drive the button through the result: ``factory.pin(5).drive_low()``.
    """
    factory = gpiozero.Device.pin_factory
    if not force:
        if factory is not None:
            return factory
        try:
            with warnings.catch_warnings():
                # gpiozero warns once per library it falls back from; the one line below says enough.
                warnings.simplefilter("ignore")
                factory = gpiozero.Device._default_pin_factory()
        except Exception as e:  # BadPinFactory, or a library that failed in its own way
            log.info("no GPIO pins here (%s): using mock pins, LED changes are only logged", e)
        else:
            log.info("using GPIO pin factory %s", type(factory).__name__)
            gpiozero.Device.pin_factory = factory
            return factory
    elif factory is not None:
        factory.close()
    gpiozero.Device.pin_factory = MockFactory()
    return gpiozero.Device.pin_factory
