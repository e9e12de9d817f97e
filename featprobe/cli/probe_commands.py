"""Stage two's commands: fit, heads, baseline, compare, predict."""

from __future__ import annotations

import json
import os

import click

from featprobe.cli.app import (
    _cache_dir_option,
    _data_options,
    _parse_params,
    _pct,
    _progress,
    _quiet_option,
    _scores,
    main,
)
from featprobe.errors import FeatprobeError


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
@click.option("--out", type=click.Path(dir_okay=False), help="Where to write image_names,"
              "label,probability [default: predictions.csv, never replaced unasked].")
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

    if out is None:
        out = "predictions.csv"
        if os.path.lexists(out):
            raise FeatprobeError(f"{out} exists (an earlier predict?): pass --out FILE to write "
                                 f"elsewhere, or --out {out} to replace it")
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
