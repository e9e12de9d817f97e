"""Sharded extraction throughput: the same extract with 1 process and with N torchrun ranks.

    .venv/bin/python bench/scale_extract.py [--n 512] [--ranks 2] [--backbone resnet18]
        [--device cpu] [--image-size 224]

(``bench/scale.py extract`` runs the same thing.) Makes ``--n`` photo-like JPEGs (500×375,
quality 90), then times ``featprobe extract`` as one process and as ``torchrun
--nproc-per-node=RANKS -m featprobe extract`` into fresh cache directories, checks the two
caches hold identical arrays (float32 storage), and prints both throughputs. Wall times are
whole commands (interpreter start, torch import, model build, rendezvous and merge
included), so each mode's fixed cost is measured on a 2-image run and the throughput past it
is printed too.
On CPU each rank gets cores/ranks threads, so on a small machine the interesting figure is that
N ranks lose nothing; the speed-up comes with one GPU per rank.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from featprobe.cache import FeatureCache  # noqa: E402


def _run(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def _cache(directory: Path, n: int) -> Path:
    return next(p for p in directory.glob("*.h5") if len(FeatureCache(p)) == n)


def run(n: int = 512, ranks: int = 2, backbone: str = "resnet18", device: str = "cpu",
        image_size: int = 224, batch_size: int = 32, workdir: Path | None = None) -> dict:
    from extract_speed import make_jpegs  # imports torch: only when this runs

    tmp = Path(workdir or tempfile.mkdtemp(prefix="fp-scale-extract-"))
    csv = make_jpegs(tmp / "data", n)
    cores = len(os.sched_getaffinity(0))
    args = ["extract", str(csv), "--backbone", backbone, "--weights", "none", "--dtype",
            "float32", "--device", device, "--image-size", str(image_size), "--batch-size",
            str(batch_size), "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    one = [sys.executable, "-m", "featprobe"] + args + ["--cache-dir", str(tmp / "one")]
    many = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={ranks}", "-m", "featprobe"] + args + ["--cache-dir",
                                                                       str(tmp / "many")]
    tiny = csv.with_name("tiny.csv")  # 2 images: start-up, model build, rendezvous, merge
    tiny.write_text("".join(csv.read_text().splitlines(keepends=True)[:3]))
    env_one = {**env, "OMP_NUM_THREADS": str(cores)}
    env_many = {**env, "OMP_NUM_THREADS": str(max(1, cores // ranks))}
    fixed_one = _run([x if x != str(csv) else str(tiny) for x in one], env_one)
    fixed_many = _run([x if x != str(csv) else str(tiny) for x in many], env_many)
    t_one = _run(one, env_one)
    t_many = _run(many, env_many)
    ca = FeatureCache(_cache(tmp / "one", n))
    cb = FeatureCache(_cache(tmp / "many", n))
    same = ca.ids == cb.ids and all(
        np.array_equal(ca.features(k), cb.features(k)) for k in ca.layers)
    # nan when the run is too small (or the machine too noisy) to rise above its fixed cost
    rate_one = (n - 2) / (t_one - fixed_one) if t_one > fixed_one else float("nan")
    rate_many = (n - 2) / (t_many - fixed_many) if t_many > fixed_many else float("nan")
    out = {"n": n, "ranks": ranks, "backbone": backbone, "device": device, "cores": cores,
           "one_s": t_one, "many_s": t_many, "fixed_one_s": fixed_one,
           "fixed_many_s": fixed_many, "one_img_s": rate_one, "many_img_s": rate_many,
           "identical": same}
    print(f"{backbone} {image_size}px on {device}, {n} JPEGs, {cores} cores, batch {batch_size}")
    print(f"  1 process       : {t_one:6.1f} s in all, {n / t_one:6.1f} img/s; "
          f"{rate_one:6.1f} img/s past the {fixed_one:.1f} s fixed cost (a 2-image run)")
    print(f"  {ranks} torchrun ranks: {t_many:6.1f} s in all, {n / t_many:6.1f} img/s; "
          f"{rate_many:6.1f} img/s past the {fixed_many:.1f} s fixed cost")
    print(f"  caches identical (ids, float32 arrays): {same}")
    print(f"{ranks} ranks / 1 process throughput past fixed costs: {rate_many / rate_one:.2f}")
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of this benchmark (also `bench/scale.py extract`'s)."""
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dir", type=Path, help="work directory (default: a new temp dir)")


def run_args(a: argparse.Namespace) -> dict:
    return run(a.n, a.ranks, a.backbone, a.device, a.image_size, a.batch_size, a.dir)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(ap)
    run_args(ap.parse_args(argv))


if __name__ == "__main__":
    main()
