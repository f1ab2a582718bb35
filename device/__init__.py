"""mushcam device runtime: capture, classify and signal on a Raspberry Pi (no TensorFlow)."""

__version__ = "0.1.0"
