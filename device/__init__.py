"""mushcam device runtime: capture, classify and signal on a Raspberry Pi (no TensorFlow)."""

import os

__version__ = "0.1.0"

# numpy's OpenBLAS starts one thread per core for the unknown-species score's single matrix-vector
# product per frame, and those threads fight the interpreter's own for the same cores. Measured here
# (`mushcam bench`, 2 cores): postprocess 6.4 ms -> 0.6 ms and a 3-frame press 40 -> 17 ms with one BLAS
# thread. Set before numpy is first imported (device.* imports it); an explicit setting still wins.
# (Not OMP_NUM_THREADS: TensorFlow's training in the same process may use OpenMP.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
