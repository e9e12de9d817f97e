"""The one exception type featprobe raises for problems a user can fix.

The CLI turns it into a one-line ``error: ...`` message and exit code 2;
anything else escaping is a bug in featprobe.
"""


class FeatprobeError(Exception):
    """Bad input, a missing file, an incomplete cache: something the user can act on."""
