"""device.ood: the unknown-species score is low near a trained class and high far from all of them."""

from __future__ import annotations

import numpy as np
import pytest

from device.bundle import load_bundle
from device.classifier import Classifier
from device.engine import CpuEngine
from device.errors import BundleError
from device.ood import OodScorer, fit_knn, fit_ood
from device.preprocess import preprocess


def clusters(rng, n_per=80, dim=12, centres=((0,) * 12, (6,) + (0,) * 11, (0, 6) + (0,) * 10)):
    x = np.concatenate([rng.normal(c, 1.0, (n_per, dim)) for c in centres])
    y = np.repeat(np.arange(len(centres)), n_per)
    return x, y


def test_fit_and_score_on_known_clusters():
    rng = np.random.default_rng(0)
    x, y = clusters(rng)
    params = fit_ood(x, y, n_classes=3, dims=8)
    assert params["components"].shape == (12, 8) and params["class_means"].shape == (3, 8)
    assert all(v.dtype == np.float32 for v in params.values())
    scorer = OodScorer(params)
    assert scorer.dims == 8
    x_new, y_new = clusters(np.random.default_rng(1), n_per=20)
    inside = np.array([scorer.score(e) for e in x_new])
    far = np.array([scorer.score(np.full(12, 20.0)), scorer.score(np.full(12, -15.0))])
    assert np.median(inside) < 1.5 and far.min() > 5 * np.percentile(inside, 99)
    # The nearest class is the one the point came from.
    assert np.mean([scorer.class_distances(e).argmin() == c for e, c in zip(x_new, y_new)]) > 0.95


def test_dims_are_clamped_to_what_the_data_supports():
    rng = np.random.default_rng(2)
    x, y = clusters(rng, n_per=3)  # 9 samples, 3 classes: at most 6 dims
    params = fit_ood(x, y, n_classes=3, dims=64)
    assert params["components"].shape[1] == 6
    assert np.isfinite(OodScorer(params).score(x[0]))


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    x, y = clusters(rng)
    params = fit_ood(x, y, 3, dims=4)
    np.savez(tmp_path / "ood.npz", **params)
    a, b = OodScorer(params), OodScorer.from_npz(tmp_path / "ood.npz")
    assert a.score(x[5]) == pytest.approx(b.score(x[5]))


def test_npz_missing_array(tmp_path):
    np.savez(tmp_path / "ood.npz", mean=np.zeros(3), components=np.eye(3))
    with pytest.raises(BundleError, match="missing array 'class_means'"):
        OodScorer.from_npz(tmp_path / "ood.npz")


@pytest.mark.parametrize("data", [b"not an npz at all", b"PK\x03\x04truncated zip"])
def test_npz_garbage(tmp_path, data):
    (tmp_path / "ood.npz").write_bytes(data)
    with pytest.raises(BundleError, match="ood.npz") as e:
        OodScorer.from_npz(tmp_path / "ood.npz")
    assert "\n" not in str(e.value)


def test_damaged_npz_only_ever_raises_bundle_error(tiny_bundle, tmp_path):
    """Random truncations and byte flips of the real ood.npz: a BundleError line, never a zipfile traceback."""
    data = (tiny_bundle / "ood.npz").read_bytes()
    rng = np.random.default_rng(0)
    path = tmp_path / "ood.npz"
    refused = 0
    for _ in range(300):
        d = bytearray(data)
        if rng.random() < 0.4:
            d = d[: int(rng.integers(1, len(d)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                d[int(rng.integers(0, len(d)))] = int(rng.integers(0, 256))
        path.write_bytes(bytes(d))
        try:
            OodScorer.from_npz(path)
        except BundleError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            refused += 1
    assert refused > 200


@pytest.mark.parametrize(
    "bad",
    [
        {"components": np.eye(3)[:, :2], "class_means": np.zeros((3, 3))},  # 2 dims vs 3-dim class means
        {"precision": np.eye(2)},
        {"mean": np.zeros(4)},
        {"mean": np.zeros((3, 1))},
    ],
)
def test_npz_with_inconsistent_shapes_is_refused(tmp_path, bad):
    arrays = {"mean": np.zeros(3), "components": np.eye(3), "class_means": np.zeros((3, 3)), "precision": np.eye(3)}
    np.savez(tmp_path / "ood.npz", **(arrays | bad))
    with pytest.raises(BundleError, match="ood.npz"):
        OodScorer.from_npz(tmp_path / "ood.npz")


def test_npz_with_pickled_objects_is_refused(tmp_path):
    # allow_pickle=False: a tampered ood.npz must not be able to run code.
    np.savez(tmp_path / "ood.npz", mean=np.array([{"x": 1}], dtype=object), components=np.eye(3),
             class_means=np.zeros((3, 3)), precision=np.eye(3))
    with pytest.raises(BundleError):
        OodScorer.from_npz(tmp_path / "ood.npz")


def test_ood_npz_for_another_embedding_size_is_refused_at_load(bundle_copy, edit_card):
    """An ood.npz from another model (its sha updated to match) is caught before any photo, not mid-classify."""
    rng = np.random.default_rng(4)
    x, y = clusters(rng, dim=12)
    np.savez(bundle_copy / "ood.npz", **fit_ood(x, y, 3, dims=3))  # 12-dim embeddings; the model's are 3
    edit_card(bundle_copy, lambda c: None, rehash=True)
    with pytest.raises(BundleError, match="ood.npz"):
        Classifier(load_bundle(bundle_copy), backend="cpu")


def test_tiny_bundle_scores_trained_colours_low_and_unseen_colours_high(tiny_bundle, rgb_array):
    bundle = load_bundle(tiny_bundle)
    engine = CpuEngine(bundle)
    scorer = OodScorer.from_npz(bundle.ood_path)
    limit = bundle.thresholds.ood_max_score

    def score(colour, seed=0):
        return scorer.score(engine.run(preprocess(rgb_array(colour, seed=seed), bundle.input)).embedding)

    for colour in ("red", "green", "blue"):
        assert max(score(colour, s) for s in range(5)) < limit / 2
    for colour in ("grey", "yellow", (255, 255, 255), (0, 0, 0)):
        assert score(colour) > 2 * limit


def test_knn_scorer_is_zero_on_a_training_photo_and_grows_away_from_them(tmp_path):
    from device.ood import KnnScorer, fit_knn, load_ood

    rng = np.random.default_rng(0)
    train = rng.normal(size=(50, 16)) + 5
    np.savez(tmp_path / "ood.npz", **fit_knn(train, k=1))
    scorer = load_ood(tmp_path / "ood.npz")
    assert isinstance(scorer, KnnScorer) and scorer.embedding_size == 16
    assert scorer.score(train[3]) < 1e-3  # float16 storage: close to, not exactly, zero
    assert scorer.score(-train[3]) > 1.5  # the opposite direction is as unfamiliar as it gets
    assert scorer.score(train[3] + rng.normal(size=16) * 3) > scorer.score(train[3] + rng.normal(size=16) * 0.3)


def test_load_ood_refuses_an_unknown_method_in_one_line(tmp_path):
    from device.errors import BundleError
    from device.ood import load_ood

    np.savez(tmp_path / "ood.npz", method=np.array("magic"), train=np.zeros((2, 2)), k=np.array(1))
    with pytest.raises(BundleError, match="unknown method 'magic'"):
        load_ood(tmp_path / "ood.npz")


# --- issue 12, item 9: an ood.npz is checked before and after it is loaded ------------------------------


def _npz_declaring(tmp_path, shape, dtype="<f2", payload=b"\0" * 64):
    """An npz whose `train.npy` header declares `shape` but holds only `payload` (a 6 MB file can say 6 GB)."""
    import io
    import zipfile

    header = np.lib.format.header_data_from_array_1_0(np.zeros(1, dtype=dtype))
    header["shape"] = shape
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    path = tmp_path / "ood.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("method.npy", _npy(np.array("knn")))
        zf.writestr("k.npy", _npy(np.array(1)))
        zf.writestr("train.npy", buf.getvalue() + payload)
    return path


def _npy(a) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_a_header_declaring_6_gb_is_refused_before_any_allocation(tmp_path, monkeypatch):
    from device.ood import load_ood

    path = _npz_declaring(tmp_path, (3_000_000, 1000))  # 6 GB of float16, in a file of a few hundred bytes
    real = np.lib.format.read_array
    monkeypatch.setattr(np.lib.format, "read_array", lambda *a, **k: pytest.fail("an array was allocated") or real(*a, **k))
    with pytest.raises(BundleError, match=r"header declares \(3000000, 1000\) float16 \(6000000000 bytes\) but it holds 64") as e:
        load_ood(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_an_npz_unpacking_past_the_cap_is_refused(tmp_path, monkeypatch):
    import device.ood as ood_mod

    monkeypatch.setattr(ood_mod, "OOD_MAX_BYTES", 1000)
    np.savez_compressed(tmp_path / "ood.npz", **fit_knn(np.ones((10, 64)), k=1))  # 1280 bytes of float16, packed
    with pytest.raises(BundleError, match="unpack to more than 1000 bytes"):
        ood_mod.load_ood(tmp_path / "ood.npz")


def test_an_oversized_npz_file_is_refused_unread(tmp_path):
    from device.ood import OOD_MAX_BYTES, load_ood

    with open(tmp_path / "ood.npz", "wb") as f:
        f.truncate(OOD_MAX_BYTES + 1)  # sparse: no disk used
    with pytest.raises(BundleError, match="over the .*-byte limit"):
        load_ood(tmp_path / "ood.npz")


@pytest.mark.parametrize("method", ["knn", "mahalanobis"])
def test_nan_embeddings_are_refused(tmp_path, method):
    """All-NaN embeddings passed the self-test, then every verdict was UNSURE."""
    from device.ood import load_ood

    rng = np.random.default_rng(5)
    x, y = clusters(rng)
    params = fit_knn(x, k=1) if method == "knn" else fit_ood(x, y, 3, dims=4)
    key = "train" if method == "knn" else "precision"
    params[key] = np.full_like(params[key], np.nan)
    np.savez(tmp_path / "ood.npz", **params)
    with pytest.raises(BundleError, match=f"array '{key}' holds NaN or infinite values"):
        load_ood(tmp_path / "ood.npz")


@pytest.mark.parametrize("k", [[1, 2], 1.5, "1", [[1]]])
def test_k_must_be_one_integer(tmp_path, k):
    """`k=[1,2]` gave a traceback."""
    from device.ood import load_ood

    np.savez(tmp_path / "ood.npz", method=np.array("knn"), train=np.ones((4, 3), np.float16), k=np.array(k))
    with pytest.raises(BundleError, match="`k` must be one integer") as e:
        load_ood(tmp_path / "ood.npz")
    assert "\n" not in str(e.value)


def test_the_shipped_index_passes_the_checks():
    from device.ood import KnnScorer, load_ood
    from tests.conftest import REPO_ROOT

    scorer = load_ood(REPO_ROOT / "models" / "mushcam-mnv2-7sp" / "ood.npz", method="knn")
    assert isinstance(scorer, KnnScorer) and scorer.embedding_size == 1280
