"""The ``featprobe`` command: a thin click layer over the library. Each command calls one library
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
        self.setStream(sys.stderr)
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


@main.command()
@click.argument("data", type=click.Path())
@_data_options
@click.option("--backbone", default="vgg16", show_default=True,
              help="Registered backbone or any torchvision classification model name.")
@click.option("--weights", default="DEFAULT", show_default=True, help="DEFAULT, a torchvision "
              "weights name (IMAGENET1K_V1...), none, or a state-dict path.")
@click.option("--layers", help="Comma-separated layers, e.g. pool5,fc7 (default: the backbone's).")
@_cache_dir_option
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--batch-size", type=click.IntRange(1),
              help="Images per batch (default: 256 GPU, 32 CPU).")
@click.option("--workers", type=click.IntRange(0),
              help="DataLoader worker processes [default: all cores but one on CUDA; 0 on CPU, "
              "where the main process decodes each batch on all cores, then runs it].")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="Unreadable image: stop naming it, or record it in /bad and go on.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="Storage type of the features.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              show_default=True, help="Compute precision (auto: fp16 on CUDA, fp32 on CPU; "
              "measured in bench/RESULTS.md).")
@click.option("--decode", type=click.Choice(["auto", "cpu", "gpu"]), default="auto",
              show_default=True, help="JPEG decoding: PIL in workers (cpu) or on the device "
              "(gpu; other formats still PIL); auto: gpu on CUDA with fewer than 8 decode "
              "workers, else cpu. Not in the cache key.")
@click.option("--image-size", type=int, help="Crop size instead of the weights' own (e.g. 224).")
@click.option("--shard", metavar="I/N",
              help="Compute only shard I of N (0-based), e.g. one task of a SLURM array; the "
              "last shard to finish merges (or run `featprobe merge`). Not with torchrun, "
              "whose ranks shard by themselves.")
@_quiet_option
def extract(data, images, image_col, label_col, allow_outside_images, backbone, weights, layers,
            cache_dir, device, batch_size, workers, on_error, dtype, precision, decode, image_size,
            shard, quiet):
    """Run a frozen backbone over every image of DATA once and cache the features.

    DATA is a CSV of image names and labels (the tutorial format: image_names,emergency_or_no)
    or a class-per-folder tree (root/<class>/<image>). The cache file name is content-addressed:
    rerunning the same command returns the finished cache at once, and an interrupted run
    resumes where it stopped. The cache's path is printed last on stdout.

    \b
    Several GPUs or nodes: torchrun --nproc-per-node=4 -m featprobe extract DATA ...
    Independent jobs:      featprobe extract DATA ... --shard 3/8   (then featprobe merge)
    """
    import os

    from featprobe.extraction.run import extract as run

    cache = run(data, images=images, backbone=backbone, weights=weights, layers=_csv_list(layers),
                cache_dir=cache_dir, device=device, batch_size=batch_size, workers=workers,
                on_error=on_error, dtype=dtype, precision=precision, image_size=image_size,
                image_col=image_col, label_col=label_col, progress=_progress(quiet), shard=shard,
                decode=decode, allow_outside_images=allow_outside_images)
    if cache is None or os.environ.get("RANK", "0") != "0":
        return  # a shard whose siblings are still running, or a torchrun rank other than 0
    if cache.bad:
        click.echo(f"skipped {len(cache.bad)} unreadable image(s), e.g. {cache.bad[0][0]}: "
                   f"{cache.bad[0][1]}", err=True)
    click.echo(str(cache.path))


@main.command()
@click.argument("cache", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(cache, as_json):
    """Show a cache's metadata, layers, shapes, completeness and bad images."""
    from featprobe.cache import FeatureCache

    c = FeatureCache(cache)
    extra = {k: v for k, v in c.meta.items() if k not in ("layers", "complete", "n_valid")}
    facts = {"path": str(c.path), "complete": True, "rows": len(c), "valid": c.n_valid,
             "bad": len(c.bad), "classes": c.classes,
             "class_counts": {str(k): int((c.labels[c.valid] == i).sum())
                              for i, k in enumerate(c.classes)},
             "layers": {k: {"shape": list(c.shapes[k]), "dtype": str(c.dtypes[k])}
                        for k in c.layers}, **extra}
    if as_json:
        click.echo(json.dumps(facts, indent=1, default=str))
        return
    for key in ("path", "complete", "rows", "valid", "bad", "classes", "class_counts"):
        click.echo(f"{key:20} {facts[key]}")
    click.echo("layers")
    for k, v in facts["layers"].items():
        click.echo(f"  {k:18} {tuple(v['shape'])} {v['dtype']}")
    for key, value in sorted(extra.items()):
        click.echo(f"{key:20} {json.dumps(value) if not isinstance(value, str) else value}")
    for image_id, reason in c.bad[:10]:
        click.echo(f"bad: {image_id}: {reason}")


@main.command()
@click.argument("cache", type=click.Path())
def merge(cache):
    """Consolidate the parts written by `extract --shard I/N` jobs into the final cache.

    CACHE is the path the shards printed (cache/<backbone>-<key>.h5) or its .partial folder.
    Needs no torch and no images: the parts folder describes itself. Prints the cache path.
    """
    from featprobe.cache import merge as run

    c = run(cache, on_wait=lambda: click.echo("another process is merging; waiting", err=True))
    click.echo(str(c.path))


@main.command()
@click.argument("cache", type=click.Path())
@click.option("--no-checksums", is_flag=True, help="Skip re-hashing the feature arrays.")
def verify(cache, no_checksums):
    """Check a cache's integrity: completeness, shapes, counts and feature checksums."""
    from featprobe.cache import verify as run

    r = run(cache, checksums=not no_checksums)
    sums = ", ".join(f"{k} sha256 ok" for k in r["checksums"]) or "checksums not checked"
    click.echo(f"ok: {r['path']}: {r['rows']} rows ({r['valid']} valid), {sums}")


@main.command(name="list")
@click.argument("cache_dir", required=False, type=click.Path(file_okay=False))
def list_(cache_dir):
    """List caches in a directory; interrupted ones are shown as incomplete."""
    from featprobe.cache import list_caches

    rows = list_caches(cache_dir)
    if not rows:
        click.echo("no caches", err=True)
    for r in rows:
        if r["complete"]:
            click.echo(f"{r['path']}  complete  {r['backbone']} {r['weights']} "
                       f"{','.join(r['layers'])} {r['n_valid']}/{r['n']} valid")
        else:
            click.echo(f"{r['path']}  INCOMPLETE  {r['error']}")


@main.command()
def backbones():
    """List registered backbones and their layers (any torchvision model name works too)."""
    from featprobe.extraction.backbones import classification_models, describe

    for b in describe():
        layers = ", ".join(f"{k} ({v})" for k, v in b["layers"].items())
        click.echo(f"{b['name']:14} {layers}   default: {','.join(b['default_layers'])}")
    click.echo("also, with layer 'penultimate' (input of the final Linear) or a module path: "
               + ", ".join(m for m in classification_models()), err=False)


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


@main.command()
@click.argument("cache", type=click.Path())
@click.option("--head", default="logreg", show_default=True,
              help="linear, mlp, logreg, svm or svm-rbf (see `featprobe heads`).")
@click.option("--layer", help="Cached layer to fit on (default: the cache's first).")
@click.option("--seed", type=int, default=0, show_default=True, help="Split and head seed.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True)
@click.option("--standardize", is_flag=True, help="Standardise features (fit on train rows).")
@click.option("--sweep", is_flag=True,
              help="linear: lr × weight-decay grid in one pass; logreg: a grid of C.")
@click.option("--epochs", type=click.IntRange(1), help="Torch heads: epochs (default 30).")
@click.option("--batch-size", type=click.IntRange(1), help="Torch heads: batch size (128).")
@click.option("--lr", type=float, help="Torch heads: learning rate.")
@click.option("--weight-decay", type=float, help="Torch heads: weight decay.")
@click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE",
              help="Any other head parameter, e.g. -p C=0.1 (repeatable).")
@click.option("--save", type=click.Path(dir_okay=False),
              help="Write the fitted head (.npz: arrays + JSON metadata, no pickle).")
@click.option("--runs-dir", type=click.Path(file_okay=False),
              help="Where runs.jsonl is appended (default: the cache's directory).")
@click.option("--max-memory", metavar="SIZE",
              help="Memory budget for features, e.g. 512MB, 2GB, 1.5GiB (default: "
                   "$FEATPROBE_MAX_MEMORY or half of the available RAM); over it, heads "
                   "train from the file in shuffled blocks (docs/heads.md).")
def fit(cache, head, layer, seed, val_fraction, standardize, sweep, epochs, batch_size, lr,
        weight_decay, params, save, runs_dir, max_memory):
    """Fit a head on a cached layer over the fixed seeded split, and record the run.

    Reads only the cache: no images, no backbone. Prints train/val accuracy, balanced
    accuracy, macro F1 and the fit time; appends the run to runs.jsonl for `featprobe compare`.
    """
    from featprobe.probe.fit import fit as run

    named = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay}
    extra = {**_parse_params(params), **{k: v for k, v in named.items() if v is not None}}
    rec = run(cache, head=head, layer=layer, seed=seed, val_fraction=val_fraction,
              standardize=standardize, sweep=sweep, save=save, runs_dir=runs_dir,
              max_memory=max_memory, progress=_progress(False), **extra)
    if rec.get("out_of_core"):
        from featprobe.probe.outofcore import describe

        click.echo(describe(rec["out_of_core"]), err=True)
    click.echo(f"{rec['backbone']}/{rec['weights']} {rec['layer']} {rec['head']}"
               f"{' (standardized)' if standardize else ''}  split {rec['split_hash']} "
               f"train {rec['n_train']} val {rec['n_val']}"
               + (f" ({rec['n_invalid']} invalid rows excluded)" if rec["n_invalid"] else ""))
    if rec["sweep"]:
        for g in rec["sweep"]["grid"]:
            keys = {k: v for k, v in g.items() if not k.endswith("accuracy")}
            click.echo(f"  sweep {json.dumps(keys)}  train {_pct(g['train_accuracy'])}  "
                       f"val {_pct(g['val_accuracy'])}")
        click.echo(f"  best {json.dumps(rec['sweep']['best'])}")
    _scores(rec)
    if save:
        click.echo(f"saved {rec['saved_head']}")


@main.command()
def heads():
    """List the registered heads and their default parameters."""
    from featprobe.probe.registry import HEADS

    for spec in HEADS.values():
        click.echo(f"{spec.name:8} {spec.description}")
        click.echo(f"{'':8} {json.dumps(spec.params(), default=str)}")


@main.command()
@click.argument("data", type=click.Path())
@_data_options
@click.option("--image-size", type=click.IntRange(8), default=224, show_default=True)
@click.option("--epochs", type=click.IntRange(1), default=15, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--val-fraction", type=float, default=0.1, show_default=True)
@_cache_dir_option
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(0), help="Decoding worker processes.")
@_quiet_option
def baseline(data, images, image_col, label_col, allow_outside_images, image_size, epochs,
             batch_size, lr, seed, val_fraction, cache_dir, device, workers, quiet):
    """Train the end-to-end CNN benchmark from pixels on the same split, and record it.

    Two conv blocks (3x3 conv, batch norm, ReLU, 2x2 max-pool) and one dense layer, Adam —
    the tutorial's simple CNN that frozen features are measured against.
    """
    from featprobe.cnn_baseline import baseline as run

    rec = run(data, images=images, image_col=image_col, label_col=label_col,
              image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
              val_fraction=val_fraction, cache_dir=cache_dir, device=device, workers=workers,
              progress=_progress(quiet), allow_outside_images=allow_outside_images)
    click.echo(f"cnn baseline  split {rec['split_hash']} train {rec['n_train']} "
               f"val {rec['n_val']}")
    _scores(rec, digits=1)


@main.command()
@click.argument("cache_dir", required=False, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]),
              default="table", show_default=True)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also draw val accuracies with error bars to this PNG (needs matplotlib).")
def compare(cache_dir, fmt, plot_path):
    """One table of every recorded run, CNN baseline included, best val accuracy first.

    Runs of the same backbone, weights, layer, head and parameters over several seeds are
    shown as mean ± std. CACHE_DIR defaults to $FEATPROBE_CACHE or ./cache.
    """
    from featprobe.runs.compare import compare as table
    from featprobe.runs.compare import format_table, plot

    df = table(cache_dir)
    if df.empty:
        raise FeatprobeError("no runs recorded yet: run `featprobe fit` or `featprobe baseline`")
    click.echo(format_table(df, fmt).rstrip("\n"))
    if plot_path:
        click.echo(f"wrote {plot(df, plot_path)}", err=True)


@main.command()
@click.argument("head_file", type=click.Path())
@click.argument("data", type=click.Path())
@_data_options
@click.option("--out", type=click.Path(dir_okay=False), default="predictions.csv",
              show_default=True, help="Where to write image_names,label,probability.")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(1))
@click.option("--workers", type=click.IntRange(0))
@_quiet_option
def predict(head_file, data, images, image_col, label_col, allow_outside_images, out, device,
            batch_size, workers, quiet):
    """Label new images with a saved head (from `featprobe fit --save`).

    Runs the backbone, weights, layer and preprocessing the head was trained on, then the
    head. DATA is a folder of images, an image, or a CSV; with a labelled CSV the accuracy is
    printed too — how to score a held-out test set.
    """
    from featprobe.prediction import predict as run

    df, acc = run(head_file, data, images=images, image_col=image_col, label_col=label_col,
                  out=out, device=device, batch_size=batch_size, workers=workers,
                  progress=_progress(quiet), allow_outside_images=allow_outside_images)
    n_bad = int((df["error"] != "").sum()) if "error" in df else 0
    if "error" in df:
        click.echo(f"{n_bad} image(s) could not be read (see the error column)", err=True)
    counts = df["label"].value_counts()
    click.echo("predicted: " + ", ".join(f"{k}: {v}" for k, v in counts.items() if k != ""))
    if acc is not None:
        click.echo(f"accuracy {_pct(acc)} on {len(df) - n_bad} images")
    click.echo(str(out))


@main.group()
def weights():
    """Manage pretrained weight files for offline machines."""


@weights.command(name="add")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--backbone", help="Check the file against this backbone's published weights.")
def weights_add(file, backbone):
    """Verify a torchvision checkpoint and put it where torchvision's loader finds it.

    FILE must be named as torchvision publishes it (e.g. mobilenet_v2-b0353104.pth): the hash
    prefix in the name is checked against the file's SHA-256 before it is copied into
    $TORCH_HOME/hub/checkpoints/.
    """
    from featprobe.extraction.weights import add_checkpoint

    click.echo(str(add_checkpoint(file, backbone)))

