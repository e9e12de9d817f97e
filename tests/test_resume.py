"""Crash safety: SIGKILL a real `featprobe extract` mid-run, resume, compare with a clean run."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from featprobe.cache import FeatureCache, list_caches
from featprobe.extraction import extract


def _dataset(root: Path, n: int) -> Path:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    lines = ["image_names,emergency_or_no"]
    for i in range(n):
        Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(
            root / "images" / f"img{i:03d}.png"
        )
        lines.append(f"img{i:03d}.png,{'yes' if i % 3 else 'no'}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


def _cmd(csv: Path, cache_dir: Path) -> list[str]:
    return [sys.executable, "-m", "featprobe", "extract", str(csv), "--backbone", "vgg16",
            "--weights", "none", "--layers", "pool5,fc7", "--image-size", "32", "--batch-size",
            "2", "--workers", "0", "--dtype", "float32", "--cache-dir", str(cache_dir), "-q"]


def test_sigkill_mid_run_then_resume_equals_clean_run(tmp_path):
    csv = _dataset(tmp_path / "data", 20)
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(csv, killed_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        parts = list(killed_dir.glob("*.partial/part-*.npz"))
        if len(parts) >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "extract finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(killed_dir.glob("*.partial/part-*.npz")))
    assert 2 <= done_at_kill < 10

    # nothing reads as complete: no .h5, listed as incomplete, `info` refuses it
    assert not list(killed_dir.glob("*.h5"))
    [entry] = list_caches(killed_dir)
    assert entry["complete"] is False
    info = subprocess.run([sys.executable, "-m", "featprobe", "info", entry["path"]],
                          capture_output=True, text=True)
    assert info.returncode == 2 and "incomplete" in info.stderr

    resumed = subprocess.run(_cmd(csv, killed_dir), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    m = re.search(r"resuming \S+: (\d+)/10 batches already done", resumed.stderr)
    # at most the batch in flight when killed (written after we counted) is recomputed
    assert m and done_at_kill <= int(m.group(1)) <= done_at_kill + 1
    path = resumed.stdout.strip().splitlines()[-1]
    assert path == entry["path"]

    clean = extract(csv, backbone="vgg16", weights="none", layers="pool5,fc7", image_size=32,
                    batch_size=2, workers=0, dtype="float32", cache_dir=tmp_path / "clean",
                    progress=False)
    a, b = FeatureCache(path), clean
    assert a.ids == b.ids and a.classes == b.classes == ["no", "yes"]
    for layer in ("pool5", "fc7"):
        np.testing.assert_array_equal(a.features(layer), b.features(layer))  # identical
    assert not list(killed_dir.glob("*.partial"))


def _held(cache_dir) -> bool:
    """Whether some process holds the writer lock of a cache being built in ``cache_dir``."""
    for lock in cache_dir.glob("*.h5.lock"):
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:  # released (and removed) since the glob
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            return True
        finally:
            os.close(fd)
    return False


def test_two_identical_extracts_one_writer(tmp_path):
    """While one computes, a second identical run waits for it, then reports the same cache.

    Deterministic: once the first holds the cache's writer lock it is paused (SIGSTOP), the
    second starts and must say it waits, then the first resumes (a small extract takes under a
    second, so two runs started together could otherwise simply finish one after the other).
    """
    csv = _dataset(tmp_path / "data", 40)
    cmd = [sys.executable, "-m", "featprobe", "extract", str(csv), "--backbone", "resnet18",
           "--weights", "none", "--image-size", "32", "--batch-size", "2", "--workers", "0",
           "--cache-dir", str(tmp_path / "c"), "-q"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not _held(tmp_path / "c"):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)
    log = tmp_path / "second.err"
    with open(log, "w") as err:
        second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        while "waiting for it" not in log.read_text():
            assert second.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        first.send_signal(signal.SIGCONT)
        procs = [first, second]
        outs = [p.communicate(timeout=300) for p in procs]
    outs[1] = (outs[1][0], log.read_text())
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1
    waited = ["waiting for it" in err for _, err in outs]
    assert waited == [False, True], outs  # exactly one writer; the other waited for its lock
    assert FeatureCache(paths.pop()).n_valid == 40
