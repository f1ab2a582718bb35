"""device.signals on gpiozero's MockFactory: real gpiozero devices, simulated pins."""

import logging
import time

import gpiozero
import pytest
from gpiozero.pins.mock import MockFactory

from device.errors import ConfigError, HardwareError
from device.signals import DEFAULT_PINS, Button, GpioSignals, Signals, use_mock_pins


@pytest.fixture
def mock_factory():
    """Install a fresh MockFactory as gpiozero's global factory; restore the previous one after."""
    saved = gpiozero.Device.pin_factory
    gpiozero.Device.pin_factory = MockFactory()
    yield gpiozero.Device.pin_factory
    # MockFactory keeps reservations at class level: reset() clears them for the next test.
    if gpiozero.Device.pin_factory is not None:
        gpiozero.Device.pin_factory.reset()
    gpiozero.Device.pin_factory = saved


@pytest.fixture
def no_factory(monkeypatch):
    """No pin factory installed and none forced by the environment, like a fresh laptop process."""
    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    saved = gpiozero.Device.pin_factory
    gpiozero.Device.pin_factory = None
    yield
    if gpiozero.Device.pin_factory is not None:
        gpiozero.Device.pin_factory.reset()
    gpiozero.Device.pin_factory = saved


def lit(factory) -> dict[str, bool]:
    return {name: bool(factory.pin(DEFAULT_PINS[name]).state) for name in ("green", "red", "amber")}


def transitions(pin) -> int:
    return len(pin.states) - 1


@pytest.mark.parametrize(
    "verdict, expected",
    [
        ("EDIBLE", {"green": True, "red": False, "amber": False}),
        ("POISONOUS", {"green": False, "red": True, "amber": False}),
        ("UNSURE", {"green": False, "red": False, "amber": True}),
    ],
)
def test_each_verdict_lights_one_led(mock_factory, verdict, expected):
    with GpioSignals() as signals:
        signals.busy()
        signals.show(verdict)
        assert lit(mock_factory) == expected
        assert signals.state == verdict


def test_changing_verdict_turns_the_previous_led_off(mock_factory):
    with GpioSignals() as signals:
        signals.show("EDIBLE")
        signals.show("POISONOUS")
        assert lit(mock_factory) == {"green": False, "red": True, "amber": False}


def test_unknown_verdict_raises_and_leaves_leds_alone(mock_factory):
    with GpioSignals() as signals:
        signals.show("POISONOUS")
        with pytest.raises(ValueError, match="EDIBLE, POISONOUS, UNSURE"):
            signals.show("edible")
        assert lit(mock_factory) == {"green": False, "red": True, "amber": False}


def test_busy_blinks_amber_until_a_verdict(mock_factory):
    amber = mock_factory.pin(DEFAULT_PINS["amber"])
    with GpioSignals(busy_blink=0.01) as signals:
        signals.busy()
        time.sleep(0.15)
        assert transitions(amber) >= 4
        assert not lit(mock_factory)["green"] and not lit(mock_factory)["red"]
        signals.show("EDIBLE")
        settled = transitions(amber)
        time.sleep(0.05)
        assert transitions(amber) == settled, "amber kept blinking after the verdict"
        assert lit(mock_factory) == {"green": True, "red": False, "amber": False}


def test_error_blinks_red_and_amber(mock_factory):
    red, amber = mock_factory.pin(DEFAULT_PINS["red"]), mock_factory.pin(DEFAULT_PINS["amber"])
    with GpioSignals(error_blink=0.01) as signals:
        signals.error()
        time.sleep(0.12)
        assert transitions(red) >= 4 and transitions(amber) >= 4
        assert not lit(mock_factory)["green"]


def test_off_turns_everything_off(mock_factory):
    with GpioSignals(busy_blink=0.01) as signals:
        signals.busy()
        time.sleep(0.03)
        signals.off()
        time.sleep(0.03)
        assert lit(mock_factory) == {"green": False, "red": False, "amber": False}
        assert signals.state == "off"


def test_close_twice_and_pins_are_released(mock_factory):
    signals = GpioSignals()
    signals.show("UNSURE")
    signals.close()
    signals.close()
    assert lit(mock_factory)["amber"] is False
    GpioSignals().close()  # the pins can be opened again


def test_changes_are_logged(mock_factory, caplog):
    caplog.set_level(logging.INFO, logger="mushcam.signals")
    with GpioSignals() as signals:
        signals.show("POISONOUS")
    assert "LEDs: POISONOUS (red solid)" in caplog.text


def test_pin_in_use_is_a_hardware_error(mock_factory):
    with GpioSignals() as signals:
        with pytest.raises(HardwareError, match="GPIO27 for the red LED: pin in use"):
            GpioSignals({"green": 6, "red": 27, "amber": 13})
        # The failed attempt released GPIO6 and left ours working.
        gpiozero.LED(6).close()
        signals.show("EDIBLE")
        assert lit(mock_factory)["green"]


def test_invalid_pin_is_a_hardware_error(mock_factory):
    with pytest.raises(HardwareError, match="GPIO99 for the green LED"):
        GpioSignals({"green": 99, "red": 27, "amber": 22})


def test_missing_pin_is_a_config_error(mock_factory):
    with pytest.raises(ConfigError, match="amber"):
        GpioSignals({"green": 17, "red": 27})


@pytest.mark.filterwarnings("ignore")
def test_no_gpio_library_is_a_hardware_error(no_factory):
    with pytest.raises(HardwareError, match="no GPIO library found"):
        GpioSignals()


def test_base_signals_tracks_state_without_hardware():
    signals = Signals()
    signals.show("UNSURE")
    assert signals.state == "UNSURE"
    signals.close()
    assert signals.state == "off"


def press(pin) -> None:
    pin.drive_low()
    pin.drive_high()


def test_button_press_fires_once_despite_bounce(mock_factory):
    calls = []
    pin = mock_factory.pin(5)
    # A generous window so a loaded test machine cannot stretch the bounce past it.
    with Button(5, bounce_time=0.2, when_pressed=lambda: calls.append(1)) as button:
        # Contact bounce: several edges within a few milliseconds, on press and on release.
        pin.drive_low()
        pin.drive_high()
        pin.drive_low()
        time.sleep(0.05)
        pin.drive_high()
        pin.drive_low()
        pin.drive_high()
        assert calls == [1]
        time.sleep(0.25)
        press(pin)
        assert calls == [1, 1]
        assert button.presses == 2


def test_wait_for_press(mock_factory):
    with Button(5, bounce_time=0) as button:
        assert button.wait_for_press(timeout=0.01) is False
        press(mock_factory.pin(5))
        assert button.wait_for_press(timeout=0.01) is True
        assert button.wait_for_press(timeout=0.01) is False  # one press is consumed once


def test_button_is_pulled_up_and_active_low(mock_factory):
    pin = mock_factory.pin(5)
    with Button(5) as button:
        assert pin.pull == "up"
        assert not button.is_pressed
        pin.drive_low()
        assert button.is_pressed


def test_failing_handler_is_logged_and_button_keeps_working(mock_factory, caplog):
    def boom():
        raise RuntimeError("handler bug")

    with Button(5, bounce_time=0, when_pressed=boom) as button:
        press(mock_factory.pin(5))
        press(mock_factory.pin(5))
        assert button.presses == 2
    assert "button handler failed" in caplog.text


def test_button_close_twice_releases_pin(mock_factory):
    button = Button(5)
    button.close()
    button.close()
    assert not button.is_pressed
    Button(5).close()


def test_button_on_a_led_pin_is_a_hardware_error(mock_factory):
    with GpioSignals():
        with pytest.raises(HardwareError, match="GPIO17 for the button"):
            Button(17)


@pytest.mark.filterwarnings("ignore")
def test_use_mock_pins_falls_back_to_mock_on_a_laptop(no_factory, caplog):
    caplog.set_level(logging.INFO, logger="mushcam.signals")
    factory = use_mock_pins()
    assert isinstance(factory, MockFactory)
    assert gpiozero.Device.pin_factory is factory
    assert "using mock pins" in caplog.text
    assert use_mock_pins() is factory  # an installed factory is kept
    calls = []
    with Button(when_pressed=lambda: calls.append(1)):
        press(factory.pin(DEFAULT_PINS["button"]))
    assert calls == [1]


def test_use_mock_pins_force_replaces_the_factory(mock_factory):
    with GpioSignals():
        pass
    fresh = use_mock_pins(force=True)
    assert fresh is not mock_factory and isinstance(fresh, MockFactory)
