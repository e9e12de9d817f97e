"""The docs tests' runner (tests/test_docs.py): ``python tests/docs_server.py SOCKET``.

It imports torch and featprobe once, then serves a Unix socket: each client (the ``featprobe``
shim the docs tests put on PATH, or the harness for a Python block) sends its stdin, stdout and
stderr file descriptors and one JSON job, ``{"argv": [...]}`` (run ``featprobe ARGV``) or
``{"python": CODE, "name": "doc.md:LINE"}``, with ``cwd`` and ``env``. A forked child takes the
descriptors as 0, 1, 2, runs the job, answers its exit status and exits (no answer: killed). So a
documented command runs as written, pipes and ``$(...)`` included, without paying the ~5 s
torch import each time. Test machinery only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _child(job: dict) -> int:
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    sys.argv = ["featprobe", *job.get("argv", [])]
    try:
        if "python" in job:
            code = compile(job["python"], job.get("name", "<doc>"), "exec")
            exec(code, {"__name__": "__main__"})
        else:
            from featprobe.cli import main

            main(job["argv"], prog_name="featprobe")
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1


def serve(path: str) -> None:
    import torch  # noqa: F401  (imported once; every forked child inherits it)
    import torchvision  # noqa: F401

    import featprobe.cli  # noqa: F401
    import featprobe.extraction.run  # noqa: F401
    import featprobe.extraction.stream  # noqa: F401
    import featprobe.probe.fit  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    print("ready", flush=True)
    while True:  # one child per job, several at once (`featprobe ... | featprobe ...` works)
        conn, _ = server.accept()
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 22, 3)
        buf = msg
        while not buf.endswith(b"\n"):
            more = conn.recv(1 << 22)
            if not more:
                break
            buf += more
        if os.fork() == 0:
            code = 70
            try:
                server.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for i, fd in enumerate(fds):
                    os.dup2(fd, i)
                sys.stdin = open(0, closefd=False)  # noqa: SIM115
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                code = _child(json.loads(buf))
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                conn.sendall(f"{code}\n".encode())
                os._exit(code)
        conn.close()
        for fd in fds:
            os.close(fd)


def request(path: str, job: dict, fds=(0, 1, 2)) -> int:
    """Send ``job`` with ``fds`` as its stdin/stdout/stderr; the child's exit status."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        data = (json.dumps(job) + "\n").encode()
        socket.send_fds(s, [data[:1]], list(fds))
        s.sendall(data[1:])
        reply = b""
        while not reply.endswith(b"\n"):
            more = s.recv(64)
            if not more:
                return 1
            reply += more
    return int(reply)


if __name__ == "__main__":
    serve(sys.argv[1])
