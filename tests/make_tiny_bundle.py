"""Build the tiny real bundle the device tests use: `python tests/make_tiny_bundle.py tests/data/tiny_bundle`.

A 16x16 int8 model whose weights are set by hand (no training): it averages the colour of the picture, so
red pictures are `red_cap` (edible), green `green_cap` and blue `blue_cap` (poisonous). Small enough to
commit (a few KB), real enough to exercise the whole device path: int8 input, int8 logits and embedding
outputs, an ood.npz, samples and sha256s. Needs TensorFlow (the workstation extra), not the tests.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from device.bundle import FORMAT, sha256_file, write_card  # noqa: E402
from device.ood import fit_ood  # noqa: E402
from device.preprocess import InputSpec, prepare_rgb  # noqa: E402

LABELS = ["red_cap", "green_cap", "blue_cap"]
EDIBILITY = {"red_cap": "edible", "green_cap": "poisonous", "blue_cap": "poisonous"}
SIZE = 16
COLOURS = {"red_cap": (210, 40, 30), "green_cap": (40, 190, 50), "blue_cap": (30, 50, 200)}


def colour_image(rgb, size=(48, 64), seed=0) -> Image.Image:
    """A noisy flat-colour photo stand-in."""
    rng = np.random.default_rng(seed)
    a = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 12, (*size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def build(out: Path) -> Path:
    import keras

    from train.export import convert_int8

    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(3, 1, use_bias=False, name="mix")(inp)
    emb = keras.layers.GlobalAveragePooling2D(name="embedding")(x)
    logits = keras.layers.Dense(3, name="logits")(emb)
    model = keras.Model(inp, [logits, emb])
    model.get_layer("mix").set_weights([np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3)])
    model.get_layer("logits").set_weights([6 * np.eye(3, dtype=np.float32), np.zeros(3, np.float32)])

    spec0 = InputSpec((SIZE, SIZE), "center_crop", 127.5, 127.5, "int8", 1 / 127.5, -1)
    rng = np.random.default_rng(1)
    calib = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(32)]
    calib += [prepare_rgb(colour_image(c, seed=i), spec0) for i, c in enumerate(COLOURS.values())]
    tflite = convert_int8(model, np.stack(calib), spec0)  # the trainer's own int8 conversion

    tmp = Path(tempfile.mkdtemp(prefix=".tiny_bundle.", dir=out.parent))
    tmp.chmod(0o755)
    (tmp / "model.tflite").write_bytes(tflite)
    from device.engine import make_interpreter

    interp = make_interpreter(tmp / "model.tflite")
    i = interp.get_input_details()[0]
    spec = InputSpec((SIZE, SIZE), "center_crop", 127.5, 127.5, "int8", float(i["quantization"][0]), int(i["quantization"][1]))
    outputs = dict(enumerate(interp.get_output_details()))
    # Both outputs have 3 values here; tell them apart by running a red picture: logits span a wider range.
    from device.preprocess import preprocess

    interp.set_tensor(i["index"], preprocess(colour_image(COLOURS["red_cap"]), spec))
    interp.invoke()
    deq = {idx: (interp.get_tensor(o["index"]).astype(np.float32) - o["quantization"][1]) * o["quantization"][0]
           for idx, o in outputs.items()}
    logits_idx = max(deq, key=lambda k: float(np.abs(deq[k]).max()))
    emb_idx = 1 - logits_idx

    def out_spec(idx):
        o = outputs[idx]
        return {"index": idx, "size": 3, "dtype": "int8", "scale": float(o["quantization"][0]), "zero_point": int(o["quantization"][1])}

    # Embeddings of noisy colour pictures per class, through the int8 model, fit the unknown-species score.
    embs, ys = [], []
    for c, label in enumerate(LABELS):
        for s in range(20):
            interp.set_tensor(i["index"], preprocess(colour_image(COLOURS[label], seed=100 + s), spec))
            interp.invoke()
            o = outputs[emb_idx]
            embs.append((interp.get_tensor(o["index"]).astype(np.float32).reshape(-1) - o["quantization"][1]) * o["quantization"][0])
            ys.append(c)
    np.savez(tmp / "ood.npz", **fit_ood(np.array(embs), np.array(ys), 3, dims=3))

    (tmp / "samples").mkdir()
    samples = []
    for label in LABELS:
        name = f"samples/{label}.jpg"
        colour_image(COLOURS[label], seed=7).save(tmp / name, quality=90)
        samples.append({"file": name, "label": label, "source": "synthetic (tests/make_tiny_bundle.py)",
                        "verdict": "EDIBLE" if EDIBILITY[label] == "edible" else "POISONOUS"})
    card = {
        "format": FORMAT,
        "name": "tiny-colours",
        "version": "0.0.1",
        "created": "2026-11-24T00:00:00Z",
        "labels": LABELS,
        "classes": {lab: {"edibility": EDIBILITY[lab], "role": EDIBILITY[lab], "display_name": lab.replace("_", " ")}
                    for lab in LABELS},
        "input": spec.to_dict(),
        "outputs": {"logits": out_spec(logits_idx), "embedding": out_spec(emb_idx)},
        "thresholds": {"edible_min_confidence": 0.9, "poisonous_max_mass": 0.05, "poisonous_min_confidence": 0.5,
                       "ood_max_score": 6.0},
        "ood": {"method": "mahalanobis", "file": "ood.npz"},
        "metrics": {"note": "synthetic test model; no real metrics"},
        # Every file the device reads is listed with its sha256 (samples too), so a signature covers them all.
        "files": {"model.tflite": sha256_file(tmp / "model.tflite"), "ood.npz": sha256_file(tmp / "ood.npz"),
                  **{s["file"]: sha256_file(tmp / s["file"]) for s in samples}},
        "samples": samples,
        "training": {"note": "hand-set weights, for tests only"},
    }
    write_card(tmp, card)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "tests" / "data" / "tiny_bundle").resolve()))
