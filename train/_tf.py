"""Lazy TensorFlow/Keras import: `mushcam-train --help` and `prepare` never pay for it."""

from __future__ import annotations

import os


def import_keras():
    """Import TensorFlow and Keras 3 quietly; returns (tf, keras)."""
    # TensorFlow's C++ INFO lines (oneDNN, CPU features) are noise to a user; keep warnings and errors.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf
    import keras

    return tf, keras
