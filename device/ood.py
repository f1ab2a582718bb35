"""Unknown-species score: how far an image's embedding lies from the photos seen in training.

A softmax always sums to one over the known species, so a mushroom the model never saw can still get a
confident edible label. Two scores, chosen by the trainer and named in `ood.npz` (`method`):

- `knn` (the default): 1 - the mean cosine similarity to the k nearest training photos. Measured best
  here: holding fly agaric out of training, at the same edible coverage it let through about half as many
  of its photos as EDIBLE as the Mahalanobis score did (see the README's leave-one-species-out table).
  With `negatives` (embeddings of OTHER fungi, trained as "not a known species"), the score is
  d_known / (d_known + d_other): below 0.5 the photo is closer to a known species' photo than to any other
  fungus's. Optionally in a PCA space (`projection`, `center`) and stored as int8 rows with per-row scales
  (`*_scale`), which keeps the index under 2 MB.
- `mahalanobis`: distance (shared covariance, in a PCA space of `dims` components) to the nearest class
  mean, divided by sqrt(dims) so thresholds read alike across sizes.

Numpy only: the trainer fits it (fit_knn / fit_ood), the device scores with it (load_ood).
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from pathlib import Path
from typing import Union

import numpy as np

from device.errors import BundleError

_KEYS = ("mean", "components", "class_means", "precision")
# The file, and all its arrays unpacked, stay under this (the shipped kNN index: 3.3 MB, 1276 x 1280
# float16); checked from the zip directory and the .npy headers before any array is allocated.
OOD_MAX_BYTES = 64 << 20
_MAX_ARRAYS = 16
_KINDS = "fiuU"  # floats and integers, and the `method` name; never objects (pickles)

NpzSource = Union[str, os.PathLike, bytes]


def fit_ood(embeddings: np.ndarray, labels: np.ndarray, n_classes: int, dims: int = 64, shrinkage: float = 0.1) -> dict:
    """Fit the score's parameters on training embeddings (rows) and their integer labels."""
    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels)
    mean = x.mean(axis=0)
    xc = x - mean
    dims = int(min(dims, x.shape[1], max(1, x.shape[0] - n_classes)))
    # PCA keeps the covariance estimate well-conditioned with a few hundred photos per class.
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    components = vt[:dims].T
    z = xc @ components
    class_means = np.stack([z[y == c].mean(axis=0) if np.any(y == c) else np.zeros(dims) for c in range(n_classes)])
    within = z - class_means[y]
    cov = within.T @ within / max(1, len(z) - n_classes)
    # Shrink towards the diagonal: stable inverse, and distances degrade gracefully on few samples.
    cov = (1 - shrinkage) * cov + shrinkage * np.diag(np.diag(cov)) + 1e-6 * np.eye(dims)
    precision = np.linalg.inv(cov)
    return {
        "mean": mean.astype(np.float32),
        "components": components.astype(np.float32),
        "class_means": class_means.astype(np.float32),
        "precision": precision.astype(np.float32),
    }


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


def _int8_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: x ~ q * scale[:, None] (error <= scale / 2 per value)."""
    scale = np.maximum(np.abs(x).max(axis=1), 1e-12) / 127.0
    return np.clip(np.round(x / scale[:, None]), -127, 127).astype(np.int8), scale.astype(np.float32)


def fit_knn(embeddings: np.ndarray, k: int = 1, negatives: np.ndarray | None = None, dims: int | None = None,
            int8: bool = False) -> dict:
    """The kNN index: training embeddings (and `negatives`), L2-normalised, float16 or int8 rows.

    `dims`: project first onto the top `dims` principal directions of all rows (centred), which keeps
    cosine neighbourhoods while shrinking the file.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    neg = None if negatives is None else np.asarray(negatives, dtype=np.float32)
    params: dict = {"method": np.array("knn"), "k": np.array(int(k))}
    if dims is not None:
        both = x if neg is None else np.concatenate([x, neg])
        center = both.mean(axis=0)
        _, _, vt = np.linalg.svd(both - center, full_matrices=False)
        proj = vt[: min(dims, vt.shape[0])].T.astype(np.float16)
        params.update(center=center.astype(np.float32), projection=proj)
        x = (x - center) @ proj.astype(np.float32)
        neg = None if neg is None else (neg - center) @ proj.astype(np.float32)
    for name, rows in (("train", x), ("negatives", neg)):
        if rows is None:
            continue
        rows = _unit(rows)
        if int8:
            params[name], params[f"{name}_scale"] = _int8_rows(rows)
        else:
            params[name] = rows.astype(np.float16)
    return params


KNN_KEYS = ("train", "k", "train_scale", "negatives", "negatives_scale", "projection", "center")


def _rows(params: dict, name: str) -> np.ndarray | None:
    if name not in params:
        return None
    rows = np.asarray(params[name], dtype=np.float32)
    if f"{name}_scale" in params:
        scale = np.asarray(params[f"{name}_scale"], dtype=np.float32).reshape(-1)
        if rows.ndim != 2 or scale.shape != (rows.shape[0],):
            raise BundleError(f"knn `{name}_scale` has {scale.shape} values for {rows.shape} rows")
        rows = rows * scale[:, None]
    return rows


class KnnScorer:
    """Scores embeddings by cosine distance to the nearest training photos; higher = less familiar."""

    def __init__(self, params: dict):
        self.train = _rows(params, "train")
        self.negatives = _rows(params, "negatives")
        k = np.asarray(params["k"])
        if k.ndim != 0 or k.dtype.kind not in "iu":
            raise BundleError(f"knn `k` must be one integer, got {k.tolist()!r}")
        self.k = int(k)
        self.projection = None if "projection" not in params else np.asarray(params["projection"], dtype=np.float32)
        self.center = None if "center" not in params else np.asarray(params["center"], dtype=np.float32).reshape(-1)
        width = self.train.shape[1] if self.train.ndim == 2 else -1
        ok = self.train.ndim == 2 and len(self.train) >= 1 and width >= 1 and 1 <= self.k <= len(self.train)
        if self.negatives is not None:
            ok = ok and self.negatives.ndim == 2 and self.negatives.shape[1] == width and len(self.negatives) >= self.k
        if self.projection is not None:
            ok = ok and self.projection.ndim == 2 and self.projection.shape[1] == width and (
                self.center is None or self.center.shape == (self.projection.shape[0],))
        if not ok:
            raise BundleError(
                f"knn arrays do not fit together (train {self.train.shape}, k {self.k}, negatives "
                f"{None if self.negatives is None else self.negatives.shape}, projection "
                f"{None if self.projection is None else self.projection.shape})")

    @property
    def embedding_size(self) -> int:
        return self.train.shape[1] if self.projection is None else self.projection.shape[0]

    def _distance(self, rows: np.ndarray, e: np.ndarray) -> float:
        sims = rows @ e
        top = np.partition(sims, len(sims) - self.k)[-self.k:]
        return float(1.0 - top.mean())

    def distances(self, embedding: np.ndarray) -> tuple[float, float | None]:
        """(cosine distance to the nearest known photos, to the nearest negatives or None)."""
        e = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if self.projection is not None:
            e = (e - self.center if self.center is not None else e) @ self.projection
        e = _unit(e)
        d_known = self._distance(self.train, e)
        return d_known, None if self.negatives is None else self._distance(self.negatives, e)

    def score(self, embedding: np.ndarray) -> float:
        d_known, d_other = self.distances(embedding)
        if d_other is None:
            return d_known
        # Both distances are >= 0 (cosine <= 1); the ratio is in [0, 1], 0.5 = as near an other fungus.
        return float(d_known / max(d_known + d_other, 1e-9))


def _check_headers(data: bytes) -> None:
    """Refuse, from the zip directory and each .npy header alone, an npz whose arrays would not fit:
    numpy allocates what a header declares before reading a byte of it (a 6 MB file can declare 6 GB)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        if len(infos) > _MAX_ARRAYS:
            raise BundleError(f"{len(infos)} arrays, more than {_MAX_ARRAYS}")
        total = 0
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise BundleError(f"unexpected member {info.filename!r}")
            total += info.file_size
            if total > OOD_MAX_BYTES:
                raise BundleError(f"its arrays unpack to more than {OOD_MAX_BYTES} bytes")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise BundleError(f"array {info.filename[:-4]!r}: .npy format {version} is not supported")
                header = f.tell()
            if dtype.hasobject or dtype.kind not in _KINDS:
                raise BundleError(f"array {info.filename[:-4]!r} has dtype {dtype}; only numbers are allowed")
            declared = math.prod(shape) * dtype.itemsize
            if declared != info.file_size - header:
                raise BundleError(
                    f"array {info.filename[:-4]!r}: its header declares {shape} {dtype} ({declared} bytes) "
                    f"but it holds {info.file_size - header}"
                )


def read_npz(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of an ood.npz's bytes, checked before and after loading: size caps, dtypes and shapes
    from the headers, no pickles, every float finite. Raises BundleError (without the file's name: the
    caller adds it)."""
    if len(data) > OOD_MAX_BYTES:
        raise BundleError(f"{len(data)} bytes, over the {OOD_MAX_BYTES}-byte limit")
    _check_headers(data)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    for key, a in arrays.items():
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise BundleError(f"array {key!r} holds NaN or infinite values")
    return arrays


def load_ood(source: NpzSource, *, name: str | os.PathLike | None = None, method: str | None = None):
    """The scorer an ood.npz holds (by its `method` array; files without one are Mahalanobis).

    `source` is the bundle's verified bytes (or a path); `name` names the file in messages; with `method`
    (the card's `ood.method`) the file must hold that kind of score.
    """
    if isinstance(source, (bytes, bytearray)):
        where = name if name is not None else "<ood.npz bytes>"
        raw = bytes(source)
    else:
        from device.bundle import read_capped

        where = name if name is not None else source
        raw = read_capped(Path(source), OOD_MAX_BYTES, "ood.npz")  # its errors name the file already
    try:
        data = read_npz(raw)
        found = data.get("method")
        if found is not None and (found.ndim != 0 or found.dtype.kind != "U"):
            raise BundleError("`method` must be one name")
        found = str(found) if found is not None else "mahalanobis"
        if method is not None and found != method:
            raise BundleError(f"holds a {found!r} score but model.json says {method!r}; re-export the bundle")
        if found == "knn":
            missing = [k for k in ("train", "k") if k not in data]
            if missing:
                raise BundleError(f"missing array {missing[0]!r}")
            return KnnScorer({k: data[k] for k in KNN_KEYS if k in data})
        if found != "mahalanobis":
            raise BundleError(f"unknown method {found!r} (knn or mahalanobis)")
        missing = [k for k in _KEYS if k not in data]
        if missing:
            raise BundleError(f"missing array {missing[0]!r}")
        return OodScorer({k: data[k] for k in _KEYS})
    except BundleError as e:
        raise BundleError(f"{where}: {e}") from None
    except (OSError, ValueError, EOFError, NotImplementedError, KeyError, zipfile.BadZipFile) as e:
        # a damaged zip shows up as any of these, depending on where the damage is
        raise BundleError(f"{where}: not a valid ood.npz ({e})") from None


class OodScorer:
    """Mahalanobis scorer with parameters from `fit_ood`; higher means less like the training data."""

    def __init__(self, params: dict):
        self.mean = np.asarray(params["mean"], dtype=np.float32)
        self.components = np.asarray(params["components"], dtype=np.float32)
        self.class_means = np.asarray(params["class_means"], dtype=np.float32)
        self.precision = np.asarray(params["precision"], dtype=np.float32)
        # Catch a mismatched file here, at load, rather than as a numpy error in the middle of a press.
        d = self.mean.shape[0] if self.mean.ndim == 1 else -1
        k = self.components.shape[1] if self.components.ndim == 2 else -1
        if d < 1 or k < 1 or self.components.shape != (d, k) or self.class_means.ndim != 2 \
                or self.class_means.shape[1] != k or self.precision.shape != (k, k):
            raise BundleError(
                f"ood arrays do not fit together (mean {self.mean.shape}, components {self.components.shape}, "
                f"class_means {self.class_means.shape}, precision {self.precision.shape})"
            )
        self.dims = k

    @property
    def embedding_size(self) -> int:
        return self.mean.shape[0]

    @classmethod
    def from_npz(cls, source: NpzSource) -> "OodScorer":
        """A Mahalanobis scorer from an ood.npz (path or bytes), checked as load_ood checks it."""
        return load_ood(source, method="mahalanobis")

    def class_distances(self, embedding: np.ndarray) -> np.ndarray:
        """Per-class distance (normalised by sqrt(dims)) of one embedding."""
        z = (np.asarray(embedding, dtype=np.float32).reshape(-1) - self.mean) @ self.components
        d = z[None, :] - self.class_means
        d2 = np.einsum("ij,jk,ik->i", d, self.precision, d)
        return np.sqrt(np.maximum(d2, 0) / self.dims)

    def score(self, embedding: np.ndarray) -> float:
        return float(self.class_distances(embedding).min())
