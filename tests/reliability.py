"""Helpers for the reliability tests (docs/reliability.md): a client for the fork server in
tests/forkserver.py, a small real dataset, the extract command line, and cache equality."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from featprobe.cache import FeatureCache, verify

N_IMAGES, BATCH = 24, 3  # 8 parts
LAYERS = ("avgpool", "layer4")  # 2 layers: consolidation copies 16 (part, layer) blocks


class ForkServer:
    """``python tests/forkserver.py``: one torch import, one forked `featprobe` per job."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.n = 0
        server = str(Path(__file__).with_name("forkserver.py"))
        self.proc = subprocess.Popen([sys.executable, server],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[str], crash_at: str | None = None, timeout: float = 180,
            **options) -> tuple:
        """Run ``featprobe <argv>``; ``options``: fsize, uid (see tests/forkserver.py)."""
        self.n += 1
        log = self.logs / f"run{self.n:02d}.log"
        job = {"argv": argv, "crash_at": crash_at, "log": str(log), **options}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            pytest.fail(f"featprobe extract hung (crash_at={crash_at}); log {log}")
        answer = json.loads(self.proc.stdout.readline())
        return answer["status"], log.read_text() if log.exists() else ""

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def make_dataset(root: Path, n: int = N_IMAGES) -> Path:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(7)
    lines = ["image_names,label"]
    for i in range(n):
        a = (rng.random((20 + i % 5, 24, 3)) * 255).astype(np.uint8)
        Image.fromarray(a).save(root / "images" / f"{i:02d}.png")
        lines.append(f"{i:02d}.png,{('cat', 'dog', 'emu')[i % 3]}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


def extract_argv(csv: Path, cache_dir: Path) -> list[str]:
    return ["extract", str(csv), "--backbone", "resnet18", "--weights", "none", "--layers",
            ",".join(LAYERS), "--image-size", "32", "--batch-size", str(BATCH), "--workers", "0",
            "--dtype", "float32", "--device", "cpu", "--cache-dir", str(cache_dir), "-q"]


def assert_same_cache(path: Path, ref: Path) -> None:
    a, b = FeatureCache(path), FeatureCache(ref)
    assert a.ids == b.ids and a.classes == b.classes
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.valid, b.valid)
    for layer in LAYERS:
        x, y = a.features(layer), b.features(layer)
        assert x.dtype == y.dtype == np.float32
        np.testing.assert_array_equal(x, y)
    with h5py.File(path, "r") as fa, h5py.File(ref, "r") as fb:
        for layer in LAYERS:
            assert fa["features"][layer].attrs["sha256"] == fb["features"][layer].attrs["sha256"]
    assert verify(path)["checksums"] == {"rows": True, **{layer: True for layer in LAYERS}}


def parts_on_disk(final: Path) -> int:
    return len(list(final.with_suffix(".partial").glob("part-*.npz")))
