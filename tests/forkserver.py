"""A fork server for the reliability tests (tests/reliability.py): ``python tests/forkserver.py``.

It imports torch and featprobe once, then for each JSON job read from stdin (``{"argv": [...],
"crash_at": "NAME:COUNT" | null, "kill_after": SECONDS | null, "log": PATH}``) forks a child that
runs ``featprobe <argv>`` with the fault hook of :mod:`featprobe.faults` armed (or is SIGKILLed
from outside after ``kill_after`` seconds), and answers one JSON line ``{"status": EXIT_CODE or
-SIGNAL, "seconds": ...}``. Optional job keys simulate a full disk (``"fsize": BYTES``:
``RLIMIT_FSIZE`` with SIGXFSZ ignored, so a write past it fails with EFBIG) and an unprivileged
user (``"uid": N``, for read-only tests when run as root). Forking from a process that has
imported torch but run nothing saves the ~5 s torch import per run.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ENV = "FEATPROBE_CRASH_AT"


def serve() -> None:
    # what `extract` and `fit` import lazily, so that a child that dropped to another uid
    # (which may not be able to read the Python installation) never needs to import
    import encodings.cp437  # noqa: F401  (zipfile, np.load)
    import encodings.utf_8_sig  # noqa: F401
    import json
    import sys
    import time

    import torch  # noqa: F401  (imported once here; every forked child inherits it)
    import torchvision  # noqa: F401

    import featprobe.extraction.run  # noqa: F401
    import featprobe.extraction.stream  # noqa: F401
    import featprobe.probe.fit  # noqa: F401
    from featprobe import faults
    from featprobe.cli import main

    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                if job.get("crash_at"):
                    os.environ[ENV] = job["crash_at"]
                if job.get("uid") is not None:
                    os.setgroups([])
                    os.setgid(job["uid"])
                    os.setuid(job["uid"])
                if job.get("fsize") is not None:
                    import resource

                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                    resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
                faults.arm(job.get("crash_at"))
                try:
                    main(job["argv"], prog_name="featprobe")
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except BaseException:  # as an uncaught exception would end `featprobe`
                    import traceback

                    traceback.print_exc()
                    code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        if job.get("kill_after") is not None:
            deadline = t0 + float(job["kill_after"])
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() >= deadline:
                    os.kill(pid, signal.SIGKILL)
                    _, status = os.waitpid(pid, 0)
                    break
                time.sleep(0.002)
        else:
            _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        out.write(json.dumps({"status": code, "seconds": round(time.monotonic() - t0, 3)}) + "\n")
        out.flush()


if __name__ == "__main__":
    serve()
