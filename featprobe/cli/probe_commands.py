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
    _seeds,
    _seeds_option,
    main,
)
from featprobe.errors import FeatprobeError
from featprobe.files import output_path


@main.command()
@click.argument("cache", type=click.Path())
@click.option("--head", default="logreg", show_default=True,
              help="linear, mlp, logreg, svm, svm-rbf or knn (see `featprobe heads`).")
@click.option("--layer", help="Cached layer to fit on (default: the cache's first).")
@click.option("--seed", type=int, default=0, show_default=True, help="Split and head seed.")
@_seeds_option
@click.option("--val-fraction", type=float, default=0.1, show_default=True)
@click.option("--standardize", is_flag=True, help="Standardise features (fit on train rows).")
@click.option("--l2-normalize", is_flag=True,
              help="Scale each feature row to unit length first (before --standardize).")
@click.option("--sweep", is_flag=True,
              help="Fit the head's grid (linear: lr x weight decay; logreg, svm: C from 1e-4 to "
                   "100) and choose on an inner split of the training rows; val scores only the "
                   "choice. knn always chooses its k so.")
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
@click.option("--force", is_flag=True,
              help="Fit and record a run even if the same configuration and seed is recorded.")
@click.option("--max-memory", metavar="SIZE",
              help="Memory budget for features, e.g. 512MB, 2GB, 1.5GiB (default: "
                   "$FEATPROBE_MAX_MEMORY or half of the available RAM); over it, heads "
                   "train from the file in shuffled blocks (docs/heads.md).")
def fit(cache, head, layer, seed, seeds, val_fraction, standardize, l2_normalize, sweep, epochs,
        batch_size, lr, weight_decay, params, save, runs_dir, force, max_memory):
    """Fit a head on a cached layer over the fixed seeded split, and record the run.

    Reads only the cache: no images, no backbone. Prints train/val accuracy, balanced
    accuracy, macro F1 and the fit time; appends the run to runs.jsonl for `featprobe compare`.
    A run already recorded (same configuration and seed) is not fitted again unless --force.
    """
    from featprobe.probe.fit import fit as run

    named = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay}
    extra = {**_parse_params(params), **{k: v for k, v in named.items() if v is not None}}
    results = run(cache, head=head, layer=layer, seed=seed, seeds=_seeds(seeds) or [seed],
                  val_fraction=val_fraction, standardize=standardize, l2_normalize=l2_normalize,
                  sweep=sweep, save=save, runs_dir=runs_dir, max_memory=max_memory,
                  progress=_progress(False), force=force, skip_recorded=not force, **extra)
    for rec in results:
        _fit_summary(rec, several=len(results) > 1)
    if len(results) > 1:
        from featprobe.runs.stats import interval

        accs = [r["val"]["accuracy"] for r in results]
        lo, hi = interval(accs, results[0]["n_train"], results[0]["n_val"])
        click.echo(f"mean val acc {_pct(sum(accs) / len(accs))} over {len(accs)} seeds, "
                   f"95% interval {_pct(lo).strip()}-{_pct(hi).strip()}")
    if save:
        click.echo(f"saved {results[-1]['saved_head']}")


def _fit_summary(rec, several: bool) -> None:
    if rec.duplicate_of and rec.estimator is None:
        click.echo(f"seed {rec['seed']}: already recorded (run {rec['run_id'][:8]}, val acc "
                   f"{_pct(rec['val']['accuracy']).strip()}); --force fits it again")
        return
    if rec.get("out_of_core"):
        from featprobe.probe.outofcore import describe

        click.echo(describe(rec["out_of_core"]), err=True)
    prep = " (l2)" * bool(rec.get("l2_normalize")) + " (standardized)" * bool(rec["standardize"])
    click.echo(f"{rec['backbone']}/{rec['weights']} {rec['layer']} {rec['head']}{prep}  "
               f"seed {rec['seed']}  split {rec['split_hash']} "
               f"train {rec['n_train']} val {rec['n_val']}"
               + (f" ({rec['n_invalid']} invalid rows excluded)" if rec["n_invalid"] else ""))
    if rec["sweep"] and not several:
        on = rec["sweep"]["selected_on"]
        click.echo(f"  chosen on an inner split of the train rows ({on['n_train']} fit, "
                   f"{on['n_val']} scored); val scores only the choice")
        for g in rec["sweep"]["grid"]:
            keys = {k: v for k, v in g.items() if not k.endswith("accuracy")}
            click.echo(f"  sweep {json.dumps(keys)}  inner train "
                       f"{_pct(g['inner_train_accuracy'])}  inner val "
                       f"{_pct(g['inner_val_accuracy'])}")
        skipped = rec["sweep"].get("not_fitted")
        if skipped:
            click.echo(f"  not fitted: {', '.join(json.dumps(p) for p in skipped)} (the walk "
                       f"stopped: {rec['sweep']['patience']} points in a row scored below the "
                       "best)")
    if rec["sweep"]:
        click.echo(f"  chosen {json.dumps(rec['sweep']['best']['params'])}")
    _scores(rec)
    if rec.duplicate_of:
        click.echo(f"  (same configuration and seed as recorded run {rec.duplicate_of[:8]}: "
                   "not recorded twice)")


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
@_seeds_option
@click.option("--val-fraction", type=float, default=0.1, show_default=True)
@_cache_dir_option
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(0), help="Decoding worker processes.")
@_quiet_option
def baseline(data, images, image_col, label_col, allow_outside_images, image_size, epochs,
             batch_size, lr, seed, seeds, val_fraction, cache_dir, device, workers, quiet):
    """Train the end-to-end CNN benchmark from pixels on the same split, and record it.

    Two conv blocks (3x3 conv, batch norm, ReLU, 2x2 max-pool) and one dense layer, Adam —
    the tutorial's simple CNN that frozen features are measured against.
    """
    from featprobe.cnn_baseline import baseline as run

    recs = run(data, images=images, image_col=image_col, label_col=label_col,
               image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
               val_fraction=val_fraction, cache_dir=cache_dir, device=device, workers=workers,
               progress=_progress(quiet), allow_outside_images=allow_outside_images,
               seeds=_seeds(seeds) or [seed])
    for rec in recs:
        click.echo(f"cnn baseline  seed {rec['seed']}  split {rec['split_hash']} "
                   f"train {rec['n_train']} val {rec['n_val']}")
        _scores(rec, digits=1)


@main.command()
@click.argument("cache_dir", required=False, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]),
              default="table", show_default=True)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also draw val accuracies with 95% intervals to this PNG (needs matplotlib).")
def compare(cache_dir, fmt, plot_path):
    """One table of every recorded run, CNN baseline included, best val accuracy first.

    Runs of one configuration (backbone, weights, layer, head, parameters) over several seeds
    are one row: their mean, the 95% interval of the mean val accuracy, and "vs best": = the
    best row, ≈ indistinguishable from it at 95%, < below it, ? no seed in common (the tests:
    docs/runs.md). A seed recorded twice counts once. CACHE_DIR defaults to $FEATPROBE_CACHE or
    ./cache.
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
    seen = int(df["in_training"].sum()) if "in_training" in df else 0
    if acc is not None:
        held = f" held-out images ({seen} training images left out)" if seen else " images"
        click.echo(f"accuracy {_pct(acc)} on {len(df) - n_bad - seen}{held}")
    elif seen and "true_label" in df:
        click.echo("no accuracy: every image was in the head's training rows")
    click.echo(str(out))


@main.command()
@click.argument("cache", type=click.Path())
@click.option("--head", "heads", multiple=True, default=["logreg"], show_default=True,
              help="Head to draw a curve for (repeatable).")
@click.option("--layer", "layers", multiple=True,
              help="Cached layer (repeatable; default: the cache's first).")
@click.option("--shots", default="1,2,4,8,16,all", show_default=True,
              help="Labelled training images per class; 'all' is every training image.")
@click.option("--tries", type=click.IntRange(1), default=5, show_default=True,
              help="Seeded draws of the training images per point.")
@click.option("--seed", type=int, default=0, show_default=True, help="Split seed.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True)
@click.option("--standardize", is_flag=True, help="Standardise features (fit on train rows).")
@click.option("--l2-normalize", is_flag=True, help="Scale each feature row to unit length.")
@click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE",
              help="A head parameter, e.g. -p C=0.1 (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]),
              default="table", show_default=True)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also draw the curves with their 95% intervals to this PNG.")
@click.option("--runs-dir", type=click.Path(file_okay=False),
              help="Where curves.jsonl is appended (default: the cache's directory).")
@_quiet_option
def curve(cache, heads, layers, shots, tries, seed, val_fraction, standardize, l2_normalize,
          params, fmt, plot_path, runs_dir, quiet):
    """How many labelled images do you need? A few-shot learning curve on cached features.

    For each number of images per class, --tries seeded draws of that many training images
    are fitted (default parameters, no sweep) and scored on the same val rows as `fit`; prints
    the mean and 95% interval per point and records the curve in curves.jsonl.
    """
    from featprobe.probe.curve import curve as run
    from featprobe.probe.curve import parse_shots
    from featprobe.runs.compare import format_table
    from featprobe.runs.curves import plot_curves, points_table

    if plot_path:  # matplotlib and the PNG's folder, before the fits
        _plot_ready()
        output_path(plot_path)
    recs = run(cache, heads=heads, layers=layers or None, shots=parse_shots(shots), tries=tries,
               seed=seed, val_fraction=val_fraction, standardize=standardize,
               l2_normalize=l2_normalize, runs_dir=runs_dir, progress=_progress(quiet),
               **_parse_params(params))
    df = points_table(recs)
    if fmt in ("csv", "json"):
        click.echo(format_table(df, fmt).rstrip("\n"))
    else:
        shown = df.assign(
            val_acc=[f"{100 * v:.1f}" for v in df["val_acc"]],
            ci=[f"{100 * lo:.1f}-{100 * hi:.1f}" for lo, hi in zip(df["val_acc_ci_low"],
                                                                 df["val_acc_ci_high"])])
        shown = shown.drop(columns=["val_acc_ci_low", "val_acc_ci_high"]).rename(
            columns={"ci": "val 95% CI"})
        if fmt == "markdown":
            lines = [list(shown.columns), ["---"] * len(shown.columns), *shown.astype(str).values]
            click.echo("\n".join("| " + " | ".join(map(str, row)) + " |" for row in lines))
        else:
            click.echo(shown.to_string(index=False))
    if plot_path:
        click.echo(f"wrote {plot_curves(recs, plot_path)}", err=True)


def _plot_ready() -> None:
    """Refuse --plot before the work when matplotlib is missing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise FeatprobeError("plotting needs matplotlib: pip install 'featprobe[plot]'")
