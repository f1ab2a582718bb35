"""Lazy TensorFlow/Keras import: `mushcam-train --help` and `prepare` never pay for it."""

from __future__ import annotations

import io
import os
import sys
import tempfile
from contextlib import contextmanager, redirect_stdout
from typing import Iterator


@contextmanager
def held_stderr(stdout: bool = False) -> Iterator[None]:
    """Hold everything written to file descriptor 2 (C++ logging included); replay it only on an exception.

    TensorFlow 2.21 logs oneDNN/CPU-feature INFO lines at import and pages of MLIR chatter while converting,
    from C++, ignoring TF_CPP_MIN_LOG_LEVEL. A user needs none of it unless something failed. With
    `stdout`, Python-level prints (Keras's export lists every variable) are held too.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no real fd 2 (embedded use): nothing to hold
        yield
        return
    printed = io.StringIO()
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            if stdout:
                with redirect_stdout(printed):
                    yield
            else:
                yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace")[-20000:])
            sys.stderr.write(printed.getvalue()[-5000:])
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def import_keras():
    """Import TensorFlow and Keras 3 quietly; returns (tf, keras)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if "tensorflow" not in sys.modules:
        with held_stderr():
            import keras  # noqa: F401
            import tensorflow  # noqa: F401
    import keras
    import tensorflow as tf

    return tf, keras
