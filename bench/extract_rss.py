"""Peak RSS and throughput of `featprobe extract` for N small images, in a fresh process.

    .venv/bin/python bench/extract_rss.py --n 200 2000 [--backbone resnet18] [--image-size 64]

Makes N small JPEGs (64×48, two classes) in a temp dir, runs `python -m featprobe extract`
into a fresh cache for each N, and prints images/s and the child's peak RSS, so memory
growth in N is visible (it should be flat). Also times an identical no-op rerun.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(root: Path, n: int) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["image_names,label"]
    for i in range(n):
        a = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(a).save(root / "images" / f"{i:05d}.jpg", quality=90)
        lines.append(f"{i:05d}.jpg,{i % 2}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


def run_child(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process."""
    pid = os.fork()
    if pid == 0:  # child: exec so that ru_maxrss is this command's alone
        os.execv(cmd[0], cmd)
    t = time.perf_counter()
    _, status, usage = os.wait4(pid, 0)
    secs = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return secs, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=64)
    args = ap.parse_args()
    print(f"{'n':>6} {'seconds':>8} {'img/s':>7} {'peak RSS MiB':>13} {'no-op rerun s':>14}")
    for n in args.n:
        with tempfile.TemporaryDirectory() as tmp:
            csv = make_images(Path(tmp), n)
            cmd = [sys.executable, "-m", "featprobe", "extract", str(csv), "--backbone",
                   args.backbone, "--weights", "none", "--image-size", str(args.image_size),
                   "--cache-dir", str(Path(tmp) / "c"), "-q"]
            secs, rss = run_child(cmd)
            again, _ = run_child(cmd)
            print(f"{n:>6} {secs:>8.1f} {n / secs:>7.1f} {rss:>13.0f} {again:>14.2f}")


if __name__ == "__main__":
    main()
