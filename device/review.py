"""`mushcam review`: the saved presses as one static HTML page, newest first.

One self-contained file: thumbnails are embedded as data URIs, the style is inline, there is no script,
so it opens from a USB stick or an e-mail with no server and no network. Each press shows its frames,
the verdict, the top three species with their probabilities, the unknown-species score against its
limit, the model and the time, and where each frame came from: what a person needs to label the photo
for the next training round.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from device.bundle import Thresholds
from device.errors import BundleError, MushcamError

log = logging.getLogger("mushcam.review")

THUMB_PX = 200  # longest side of an embedded thumbnail: enough to recognise a mushroom, ~10 kB each
BADGE_COLOURS = {"EDIBLE": "#1a7f37", "POISONOUS": "#c62828", "UNSURE": "#e8a200"}
OTHER_COLOUR = "#5f6368"  # a record without a known verdict

STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5em; color: #202124; background: #fafafa; }
h1 { font-size: 1.4em; margin: 0 0 .2em; }
.warn { color: #c62828; font-weight: 600; }
.press { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 1em; margin: 1em 0;
         display: grid; grid-template-columns: 10em 1fr; gap: .5em 1.2em; }
.badge { color: #fff; font-weight: 700; font-size: 1.2em; padding: .6em .4em; border-radius: 6px;
         text-align: center; align-self: start; grid-row: span 2; }
.frames img { width: 160px; height: 120px; object-fit: cover; margin-right: 6px; border-radius: 4px; }
.facts table { border-collapse: collapse; }
.facts td { padding: 1px 8px 1px 0; vertical-align: top; }
.bar { display: inline-block; height: .7em; background: #8ab4f8; }
.muted { color: #5f6368; font-size: .9em; }
code { font-size: .85em; }
"""


def list_presses(root: Path) -> list[Path]:
    """The saved presses under ``root``, newest first (their names start with the time of the press)."""
    return sorted((p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name, reverse=True)


def _thumbnail(path: Path) -> str | None:
    """A small JPEG of ``path`` as a data URI, or None if it cannot be read."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
    except (OSError, UnidentifiedImageError) as e:
        log.warning("review: cannot read %s: %s", path, e)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _top(record: dict, k: int = 3) -> list[dict]:
    """The top-k species: the record's own list, or (older records) ranked from its probabilities."""
    if isinstance(record.get("top"), list):
        return [t for t in record["top"][:k] if isinstance(t, dict)]
    probs = record.get("probs") or {}
    ranked = sorted(probs.items(), key=lambda kv: -kv[1])[:k]
    return [{"label": lab, "display_name": lab, "probability": p} for lab, p in ranked]


def _pct(p) -> str:
    # Rounded down and at most 99.9 %, as on the device's display: a model is never 100 % sure.
    return f"{min(99.9, math.floor(1000 * p) / 10):.1f}%" if isinstance(p, (int, float)) else "?"


def _ood_line(record: dict) -> str:
    score = record.get("ood_score")
    # The limit the device decided at (margin included): the raw ood_max_score would show "familiar" for a
    # score the device rejected. A record whose thresholds no longer parse still shows its score.
    try:
        limit = Thresholds.from_dict(record.get("thresholds")).ood_limit
    except BundleError:
        limit = None
    if score is None:
        return "no unknown-species score" if limit is not None else "the model has no unknown-species score"
    if limit is None:
        return f"{score:.3f}"
    verdict = "familiar" if score <= limit else "unlike the training species"
    return f"{score:.3f} (limit {limit:.3f}: {verdict})"


def _frame_files(press: Path, record: dict) -> list[Path]:
    names = record.get("frames")
    if isinstance(names, list) and names:
        return [press / str(n) for n in names]
    return sorted(press.glob("frame_*.jpg"), key=lambda p: p.name)


def press_html(press: Path) -> str:
    """One press as an HTML fragment; a damaged record is shown as such, never skipped silently."""
    e = html.escape
    try:
        record = json.loads((press / "result.json").read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return (f'<section class="press" data-verdict="none"><div class="badge" style="background:{OTHER_COLOUR}">'
                f'NO RECORD</div><div class="facts"><b>{e(press.name)}</b><br>result.json unreadable: {e(str(err))}'
                "</div></section>")
    verdict = str(record.get("verdict", "?"))
    colour = BADGE_COLOURS.get(verdict, OTHER_COLOUR)
    sources = record.get("frame_sources") or []
    frames = []
    for i, f in enumerate(_frame_files(press, record)):
        uri = _thumbnail(f)
        source = sources[i] if i < len(sources) else ""
        title = e(f"{f.name} from {source}" if source else f.name)
        frames.append(f'<img src="{uri}" alt="{e(f.name)}" title="{title}">' if uri else f"<span>{e(f.name)}: unreadable</span>")
    rows = "".join(
        f'<tr><td>{e(str(t.get("display_name") or t.get("label")))}</td><td>{_pct(t.get("probability"))}</td>'
        f'<td><span class="bar" style="width:{max(1, round(100 * float(t.get("probability") or 0)))}px"></span></td></tr>'
        for t in _top(record))
    name = record.get("display_name") or record.get("label") or "-"
    distinct = sorted({str(s) for s in sources})
    source_text = ", ".join(distinct) if distinct else "not recorded"
    return f"""<section class="press" data-verdict="{e(verdict)}" id="{e(press.name)}">
<div class="badge" style="background:{colour}">{e(verdict)}<br><small>{_pct(record.get("confidence"))}</small></div>
<div class="frames">{"".join(frames)}</div>
<div class="facts">
<b>{e(str(name))}</b> <span class="muted">({e(str(record.get("reason", "")))})</span>
<table>{rows}</table>
<div>unknown-species score: {e(_ood_line(record))}</div>
<div class="muted">model {e(str(record.get("model", "?")))} {e(str(record.get("model_version", "?")))}
 &middot; {e(str(record.get("time", "?")))} &middot; press <code>{e(press.name)}</code></div>
<div class="muted">source: <code>{e(source_text)}</code></div>
</div></section>"""


def _safe_press_html(press: Path) -> str:
    try:
        return press_html(press)
    except (TypeError, ValueError, AttributeError, KeyError) as err:  # a record with fields of the wrong type
        return (f'<section class="press" data-verdict="none"><div class="badge" style="background:{OTHER_COLOUR}">'
                f"NO RECORD</div><div class=\"facts\"><b>{html.escape(press.name)}</b><br>result.json is damaged: "
                f"{html.escape(str(err))}</div></section>")


def render_review(root: Path, limit: int | None = None) -> str:
    """The review page for the captures folder ``root`` (the newest ``limit`` presses)."""
    root = Path(root)
    if not root.is_dir():
        raise MushcamError(f"no captures folder at {root}; a daemon with [captures] enabled (the laptop default: "
                           "./captures) writes one")
    presses = list_presses(root)
    shown = presses[:limit] if limit else presses
    made = datetime.now(timezone.utc).isoformat(timespec="seconds")
    more = f" (the newest {len(shown)} shown)" if len(shown) < len(presses) else ""
    body = "\n".join(_safe_press_html(p) for p in shown) or "<p>No presses saved yet.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mushcam review: {html.escape(str(root))}</title>
<style>{STYLE}</style></head><body>
<h1>mushcam review</h1>
<p>{len(presses)} press(es) in <code>{html.escape(str(root))}</code>{more}, newest first; made {made}.</p>
<p class="warn">Never eat a mushroom on this advice alone: these verdicts are a prototype's guesses.</p>
{body}
</body></html>
"""


def write_review(root: Path, out: Path, limit: int | None = None) -> int:
    """Write the page to ``out`` (atomically); return the number of presses in ``root``."""
    text = render_review(root, limit)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise MushcamError(f"cannot write the review page {out}: {err}") from err
    return len(list_presses(root))
