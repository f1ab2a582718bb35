"""mushcam training toolchain: photos -> int8 TFLite model bundle (workstation only)."""
