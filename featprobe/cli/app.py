"""The ``featprobe`` group: error handling, logging and the options commands share.

The command line is a thin click layer over the library. Each command calls one library
function; a :class:`FeatprobeError` becomes ``error: <msg>`` on stderr and exit code 2. Results
go to stdout (``extract``: the cache path last), progress and notes to stderr."""

from __future__ import annotations

import errno
import json
import logging
import sys

import click

from featprobe import __version__
from featprobe.errors import FeatprobeError

# the machine's problems, not featprobe's: a read-only place, a full disk, a file-size limit
_ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                       errno.EFBIG}
_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _usage_error(e: click.UsageError):
    """click's usage errors in our format: one line, exit code 2, with where to look. A bare
    ``featprobe`` (or a group without its subcommand) still prints the help."""
    if _NO_ARGS and isinstance(e, _NO_ARGS):
        raise e
    where = e.ctx.command_path if e.ctx is not None else "featprobe"
    msg = " ".join(e.format_message().split())
    click.echo(f"error: {msg} (see: {where} --help)", err=True)
    sys.exit(2)


class _Group(click.Group):
    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            _usage_error(e)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            _usage_error(e)
        except FeatprobeError as e:
            click.echo("error: " + " ".join(str(e).split()), err=True)  # always one line
            ctx.exit(2)
        except OSError as e:
            if e.errno not in _ENVIRONMENT_ERRNOS:
                raise
            where = f": {e.filename}" if e.filename else ""
            click.echo("error: " + " ".join(f"{e.strerror or e}{where}".split()), err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; rerun the same command to resume", err=True)
            ctx.exit(130)


class _Stderr(logging.StreamHandler):
    """featprobe's messages on whatever ``sys.stderr`` is when they are emitted (progress bars
    share it; stdout is for results)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # not setStream: it flushes the old one, which may be closed
        super().emit(record)


def _configure_logging(verbose: int, quiet: bool) -> None:
    logger = logging.getLogger("featprobe")
    for h in [h for h in logger.handlers if isinstance(h, _Stderr)]:
        logger.removeHandler(h)
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="featprobe")
@click.option("-v", "--verbose", count=True, help="More messages on stderr (debug detail).")
@click.option("-q", "--quiet", is_flag=True,
              help="Only warnings and errors on stderr, no progress bars.")
@click.pass_context
def main(ctx, verbose, quiet):
    """Extract frozen-backbone features once; fit and compare heads on them many times.

    \b
    featprobe extract data/train.csv --images data/images   # -> cache/vgg16-<key>.h5
    featprobe fit cache/vgg16-<key>.h5 --head logreg        # seconds, recorded in runs.jsonl
    featprobe baseline data/train.csv                        # the end-to-end CNN benchmark
    featprobe compare                                        # one table of every run

    Results go to stdout; progress bars, notes and warnings to stderr (-q: warnings only).
    """
    _configure_logging(verbose, quiet)
    ctx.obj = {"quiet": quiet}


def _progress(quiet: bool) -> bool:
    """Progress bars unless the command's or the group's ``-q`` says otherwise."""
    obj = click.get_current_context().find_root().obj or {}
    return not (quiet or obj.get("quiet"))


def _csv_list(value: str | None) -> list[str] | None:
    return [x.strip() for x in value.split(",") if x.strip()] if value else None


_cache_dir_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False), default=None,
    help="Where caches and runs.jsonl live (default: $FEATPROBE_CACHE or ./cache).")
_quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")


def _data_options(command):
    """DATA's options, shared by extract, baseline and predict."""
    command = click.option("--label-col", help="CSV column with labels (auto-detected for two "
                           "columns; for predict, true labels to score).")(command)
    command = click.option("--image-col", help="CSV column with image names (auto-detected).")(
        command)
    command = click.option("--allow-outside-images", is_flag=True, help="Accept CSV image names "
                           "that leave the image folder (../x.jpg, absolute paths).")(command)
    return click.option("--images", type=click.Path(),
                        help="Image folder for a CSV (default: images/ beside it).")(command)


def _scores(rec: dict, digits: int = 2) -> None:
    tr, va = rec["train"], rec["val"]
    click.echo(f"train acc {_pct(tr['accuracy'])}   val acc {_pct(va['accuracy'])}   "
               f"val balanced acc {_pct(va['balanced_accuracy'])}   "
               f"val macro F1 {va['macro_f1']:.3f}   fit {rec['fit_seconds']:.{digits}f}s")


def _parse_params(items: tuple[str, ...]) -> dict:
    """``-p lr=0.01 -p epochs=50`` → {"lr": 0.01, "epochs": 50} (JSON values, else strings)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FeatprobeError(f"--param expects NAME=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _pct(x) -> str:
    return "  n/a" if x is None else f"{100 * x:5.1f}%"


def _seeds(seeds: str | None) -> list[int] | None:
    """``--seeds 0-9`` or ``--seeds 0,3,7`` (or ``0-4,10``) as a list; None without it."""
    if seeds is None:
        return None
    out: list[int] = []
    for part in (p.strip() for p in seeds.split(",") if p.strip()):
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise FeatprobeError(f"--seeds takes numbers and ranges like 0-9 or 0,3,7, not "
                                 f"{part!r}") from None
        if last < first or last - first > 10_000:
            raise FeatprobeError(f"--seeds range {part!r} is empty or too long")
        out += [s for s in range(first, last + 1) if s not in out]
    if not out:
        raise FeatprobeError("--seeds is empty")
    return out


def _seeds_option(command):
    return click.option("--seeds", metavar="LIST", help="Several seeded splits, one run each: "
                        "0-9 or 0,3,7 (overrides --seed). compare pools them with a 95% "
                        "interval.")(command)
