"""The heads' public names where 0.1.0 put them (``from featprobe.heads import LinearHead``,
``fp.heads.make_head``); they live in :mod:`featprobe.probe`."""

from featprobe.probe import *  # noqa: F403
from featprobe.probe import __all__  # noqa: F401
