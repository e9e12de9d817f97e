"""Kill soak: SIGKILL `featprobe extract` at random moments, resume, and check every round.

Complements tests/test_kill_anywhere.py (20 named points, deterministic) with kills at random
times from outside the process, as a user's `kill -9`, an OOM kill or a pre-empted job would.
Each round extracts a fresh cache; every run is killed after a random delay drawn from
[0, a clean run's time] until one finishes on its own. After every kill nothing may read
as complete unless it equals the uninterrupted cache; at the end of each round the cache must
equal it array for array (float32, CPU) and no partial or temporary files may remain.

    .venv/bin/python bench/soak.py --rounds 20          # prints counts; exit 1 on any failure

Runs are forked from ``python -m featprobe.faults`` (torch imported once), so a run costs
about a second on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from featprobe.cache import FeatureCache, list_caches, verify
from featprobe.errors import FeatprobeError


def make_dataset(root: Path, n: int) -> Path:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(7)
    lines = ["image_names,label"]
    for i in range(n):
        Image.fromarray((rng.random((24, 28, 3)) * 255).astype(np.uint8)).save(
            root / "images" / f"{i:03d}.png")
        lines.append(f"{i:03d}.png,{('cat', 'dog', 'emu')[i % 3]}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


def phase(cache_dir: Path, final: Path) -> str:
    """Where the kill landed, judged from what is on disk."""
    if final.exists():
        return "after the final rename"
    if list(cache_dir.glob(final.name + ".tmp-*")):
        return "while consolidating"
    partial = final.with_suffix(".partial")
    if not partial.exists():
        return "before the partial folder"
    parts = len(list(partial.glob("part-*.npz")))
    return "before the first part" if parts == 0 else "writing parts"


def same(a: Path, b: Path) -> bool:
    x, y = FeatureCache(a), FeatureCache(b)
    return (x.ids == y.ids and x.classes == y.classes and np.array_equal(x.labels, y.labels)
            and all(np.array_equal(x.features(k), y.features(k)) for k in x.layers))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    work = Path(tempfile.mkdtemp(prefix="featprobe-soak-"))
    csv = make_dataset(work / "data", args.images)
    server = subprocess.Popen([sys.executable, "-m", "featprobe.faults"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def run(cache_dir: Path, kill_after: float | None) -> tuple[int, float, str]:
        log = work / "log.txt"
        log.unlink(missing_ok=True)
        argv = ["extract", str(csv), "--backbone", "resnet18", "--weights", "none", "--layers",
                "avgpool,layer4", "--image-size", "32", "--batch-size", str(args.batch_size),
                "--workers", "0", "--dtype", "float32", "--device", "cpu",
                "--cache-dir", str(cache_dir), "-q"]
        job = {"argv": argv, "crash_at": None, "kill_after": kill_after, "log": str(log)}
        server.stdin.write(json.dumps(job) + "\n")
        server.stdin.flush()
        answer = json.loads(server.stdout.readline())
        return answer["status"], answer["seconds"], log.read_text() if log.exists() else ""

    t0 = time.monotonic()
    status, clean_s, log = run(work / "ref", None)
    assert status == 0, log
    ref = Path(log.strip().splitlines()[-1])
    counts: Counter = Counter()
    phases: Counter = Counter()
    failures = []
    for r in range(args.rounds):
        cache_dir = work / f"round{r}"
        final = cache_dir / ref.name
        while True:
            status, _, log = run(cache_dir, float(rng.uniform(0, clean_s)))
            counts["runs"] += 1
            if status == 0:
                break
            if status != -9:
                failures.append(f"round {r}: exit {status}: {log[-300:]}")
                break
            counts["kills"] += 1
            phases[phase(cache_dir, final)] += 1
            try:  # nothing reads as complete unless it is, and equal
                complete = FeatureCache(final) is not None
            except FeatprobeError:
                complete = False
            if complete and not same(final, ref):
                failures.append(f"round {r}: a complete cache differs after a kill")
            listed = list_caches(cache_dir) if cache_dir.exists() else []
            if any(e["complete"] and e["path"] != str(final) for e in listed):
                failures.append(f"round {r}: something else reads as complete: {listed}")
        if status == 0:
            ok = same(final, ref) and bool(verify(final)["checksums"])
            debris = [p.name for p in cache_dir.iterdir()
                      if p.name.endswith(".partial") or ".tmp-" in p.name]
            counts["rounds identical"] += ok and not debris
            if not ok or debris:
                failures.append(f"round {r}: differs={not ok} debris={debris}")
        shutil.rmtree(cache_dir, ignore_errors=True)
    server.stdin.close()
    server.wait()
    shutil.rmtree(work, ignore_errors=True)
    print(f"soak: {args.rounds} rounds, {counts['runs']} runs, {counts['kills']} SIGKILLs at "
          f"random times (clean run {clean_s:.2f} s); {counts['rounds identical']}/{args.rounds}"
          f" rounds ended identical to the uninterrupted cache with no debris; "
          f"{len(failures)} failures; {time.monotonic() - t0:.0f} s")
    print("kills landed: " + ", ".join(f"{k} {v}" for k, v in phases.most_common()))
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
