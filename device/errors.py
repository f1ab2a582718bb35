"""One small exception hierarchy. The CLI turns any of these into one line and an exit code.

Each message should say what went wrong, where, and what to do about it. Each class is also a builtin
exception (as gpiozero does) so callers that only know Python's own exceptions still catch them.
"""


class MushcamError(Exception):
    """Base of every error mushcam reports to a user as one line."""


class ConfigError(MushcamError, ValueError):
    """The configuration file or a command-line setting is invalid."""


class BundleError(MushcamError, ValueError):
    """A model bundle is missing, incomplete, tampered with or inconsistent."""


class SignatureError(BundleError):
    """A bundle's signature is missing or does not verify while one is required."""


class ImageError(MushcamError, ValueError):
    """An image could not be decoded or converted."""


class CameraError(MushcamError, OSError):
    """The camera could not be opened or stopped delivering frames."""


class InferenceError(MushcamError, RuntimeError):
    """The inference runtime could not be loaded or failed to run the model."""


class HardwareError(MushcamError, OSError):
    """A GPIO or display device could not be set up."""


class ReleaseError(MushcamError, RuntimeError):
    """The device's release store refused an operation (install, switch, rollback, health check)."""


class LockError(ReleaseError):
    """Another release operation (a flash, say) holds the model root's lock."""


class DataError(MushcamError, ValueError):
    """A training data set is unusable (train/ only)."""


class ExportGateError(MushcamError, RuntimeError):
    """The exported int8 model lost too much accuracy and was not written (train/ only)."""
