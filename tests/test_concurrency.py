"""Concurrency: 8 `featprobe fit` processes released at the same instant on one cache append
to one runs.jsonl; no line is lost, torn or interleaved.

(Two identical `featprobe extract` processes, one writing and one waiting for its lock, are
tested in tests/test_resume.py::test_two_identical_extracts_one_writer; the runs log under
160 concurrent raw appends in tests/test_runs.py.)
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
from contextlib import redirect_stderr, redirect_stdout

from test_fitting import synthetic_cache

from featprobe.runs import RECORD_FIELDS, read_runs

N = 8


def _fit_process(barrier, cache: str, head: str, seed: int, out: str) -> None:
    from featprobe.cli import main

    buf = io.StringIO()
    barrier.wait(timeout=60)  # all 8 start fitting at once
    with redirect_stdout(buf), redirect_stderr(buf):
        try:
            main(["fit", cache, "--head", head, "--seed", str(seed), "--layer", "fc7"],
                 prog_name="featprobe")
            code = 0
        except SystemExit as e:
            code = e.code or 0
    with open(out, "w") as f:
        f.write(f"{code}\n{buf.getvalue()}")
    os._exit(0)


def test_eight_parallel_fit_processes_append_whole_lines(tmp_path):
    cache = synthetic_cache(tmp_path / "c", n=400, d=256)
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(N)
    jobs = [("logreg" if i % 2 == 0 else "svm", i) for i in range(N)]
    procs = [ctx.Process(target=_fit_process,
                         args=(barrier, str(cache.path), head, seed, str(tmp_path / f"o{seed}")))
             for head, seed in jobs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    for _, seed in jobs:
        code, *printed = (tmp_path / f"o{seed}").read_text().splitlines()
        assert code == "0", printed
        assert any(line.startswith("train acc") for line in printed), printed

    raw = (cache.directory / "runs.jsonl").read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == N
    records = [json.loads(line) for line in raw.decode().splitlines()]  # each line whole
    assert sorted((r["head"], r["seed"]) for r in records) == sorted(jobs)
    assert len({r["run_id"] for r in records}) == N
    assert all(set(RECORD_FIELDS) <= set(r) for r in records)
    assert read_runs(cache.directory) == records
