"""The product's one fault hook: ``crash_point(name)`` SIGKILLs this process at a named moment
of a write when the reliability tests ask for it, and otherwise does nothing (one comparison).

``FEATPROBE_CRASH_AT=NAME[:COUNT]`` arms it at import: the COUNT-th visit (default 1) to point
NAME is ``kill -9``; ``FEATPROBE_CRASH_RANK=R`` limits that to torchrun rank R. The points are
listed in docs/reliability.md; tests/forkserver.py drives them.
"""

from __future__ import annotations

import os
import signal

ENV = "FEATPROBE_CRASH_AT"
_target: tuple[str, int] | None = None
_seen = 0


def arm(spec: str | None) -> None:
    """Arm (``"NAME"`` or ``"NAME:COUNT"``) or disarm (None or "") the crash point."""
    global _target, _seen
    _seen = 0
    name, _, count = (spec or "").partition(":")
    _target = (name, int(count) if count else 1) if name else None


def crash_point(name: str) -> None:
    """SIGKILL this process if ``name`` is the armed point and this is its COUNT-th visit."""
    global _seen
    if _target is not None and _target[0] == name:
        _seen += 1  # visits from several threads may race; the tests arm points of one thread
        if _seen == _target[1]:
            os.kill(os.getpid(), signal.SIGKILL)


if os.environ.get("FEATPROBE_CRASH_RANK", os.environ.get("RANK")) == os.environ.get("RANK"):
    arm(os.environ.get(ENV))
