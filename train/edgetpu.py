"""`edgetpu`: compile a bundle's model.tflite for a Coral Edge TPU and add it to the bundle.

Runs Coral's `edgetpu_compiler -s -o TMP model.tflite` (x86-64 Linux only; from Coral's apt repository),
reads its operation log for operations left on the CPU, then copies model_edgetpu.tflite into the bundle
and records it in the card: `files` (sha256) and an `edgetpu` section (compiler version, operations on
the Edge TPU and on the CPU). The card is rewritten atomically and the bundle re-validated.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from device.errors import BundleError, MushcamError

COMPILER = "edgetpu_compiler"
OUTPUT = "model_edgetpu.tflite"
MAPPED = "Mapped to Edge TPU"
_OP_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)\s+(\d+)\s+(\S.*?)\s*$")
_VERSION = re.compile(r"Edge TPU Compiler version\s+(\S+)")
_COUNT = re.compile(r"Number of operations that will run on (Edge TPU|CPU):\s*(\d+)")


class CompilerNotFound(MushcamError, FileNotFoundError):
    """edgetpu_compiler is not on PATH."""


@dataclass
class CompileReport:
    """What the compiler said: its version, and which operations stay on the CPU."""

    version: str | None
    ops_on_tpu: int | None
    ops_on_cpu: int | None
    cpu_ops: list[dict] = field(default_factory=list)  # {"op", "count", "reason"}

    def to_dict(self) -> dict:
        return {"compiler_version": self.version, "ops_on_edgetpu": self.ops_on_tpu,
                "ops_on_cpu": self.ops_on_cpu, "cpu_ops": self.cpu_ops}


def parse_log(text: str) -> CompileReport:
    """Parse edgetpu_compiler's stdout and/or its .log: version, counts, and the operator table."""
    version = _VERSION.search(text)
    counts = {m.group(1): int(m.group(2)) for m in _COUNT.finditer(text)}
    table: dict[tuple[str, str], int] = {}
    for line in text.splitlines():
        m = _OP_LINE.match(line.strip())
        if m and m.group(3) != MAPPED:
            # The same row can appear in both stdout and the log: keep the largest count per (op, reason).
            key = (m.group(1), m.group(3))
            table[key] = max(table.get(key, 0), int(m.group(2)))
    cpu_ops = [{"op": op, "count": n, "reason": reason} for (op, reason), n in table.items()]
    on_cpu = counts.get("CPU")
    if on_cpu is None and (cpu_ops or "Operator" in text):
        on_cpu = sum(o["count"] for o in cpu_ops)
    return CompileReport(version.group(1) if version else None, counts.get("Edge TPU"), on_cpu, cpu_ops)


def compile_bundle(bundle_path: Path, compiler: str = COMPILER, timeout: float = 600.0) -> CompileReport:
    """Compile BUNDLE/model.tflite, add model_edgetpu.tflite to the bundle and its card; return the report."""
    from device.bundle import load_bundle, sha256_file, write_card

    exe = shutil.which(compiler)
    if exe is None:
        raise CompilerNotFound(
            f"{compiler} not found: install it from Coral's apt repository (x86-64 Linux only), or skip this step"
        )
    bundle = load_bundle(bundle_path)
    with tempfile.TemporaryDirectory(prefix="mushcam-edgetpu-") as tmp:
        cmd = [exe, "-s", "-o", tmp, str(bundle.model_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BundleError(f"{compiler} did not finish within {timeout:.0f} s") from None
        except OSError as e:
            raise BundleError(f"{compiler} could not be run ({e})") from None
        compiled = Path(tmp) / OUTPUT
        log_file = Path(tmp) / "model_edgetpu.log"
        text = proc.stdout + "\n" + proc.stderr
        if log_file.is_file():
            text += "\n" + log_file.read_text(errors="replace")
        if proc.returncode != 0 or not compiled.is_file():
            last = next((ln for ln in reversed(text.strip().splitlines()) if ln.strip()), "no output")
            raise BundleError(f"{compiler} failed on {bundle.model_path} (exit {proc.returncode}): {last.strip()}")
        report = parse_log(text)
        # Copy beside the final name, then rename: the bundle never holds a half-written model.
        fd, partial = tempfile.mkstemp(prefix=f".{OUTPUT}.", dir=bundle.path)
        os.close(fd)
        try:
            shutil.copyfile(compiled, partial)
            os.chmod(partial, 0o644)
            os.replace(partial, bundle.path / OUTPUT)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
    card = dict(bundle.card)
    card["files"] = {**card["files"], OUTPUT: sha256_file(bundle.path / OUTPUT)}
    card["edgetpu"] = {**report.to_dict(), "compiled": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    write_card(bundle.path, card)
    load_bundle(bundle.path)
    return report
