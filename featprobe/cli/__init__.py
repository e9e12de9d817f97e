"""The ``featprobe`` command: a thin click layer over the library. Each command calls one library
function; a :class:`FeatprobeError` becomes ``error: <msg>`` on stderr and exit code 2. Results
go to stdout (``extract``: the cache path last), progress and notes to stderr.

``app`` holds the group and what commands share; each stage's commands live in their own
module, registered on import here (the imports below)."""

from featprobe.cli import cache_commands, probe_commands, report_command  # noqa: F401
from featprobe.cli.app import main

__all__ = ["main"]
