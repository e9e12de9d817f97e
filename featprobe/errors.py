"""The one exception type featprobe raises for problems a user can fix.

The CLI turns it into a one-line ``error: ...`` message and exit code 2;
anything else escaping is a bug in featprobe.
"""


class FeatprobeError(Exception):
    """Bad input, a missing file, an incomplete cache: something the user can act on."""


def some(items, n: int = 5, sep: str = ", ") -> str:
    """The first ``n`` of ``items`` for an error message, and how many more there are."""
    items = [s if len(s := str(x)) <= 200 else f"{s[:80]}...({len(s)} characters)...{s[-40:]}"
             for x in items]
    return sep.join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")
