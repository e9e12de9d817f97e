"""The ``featprobe`` command: a thin click layer over the library.

Every command calls one library function; a :class:`FeatprobeError` becomes ``error: <msg>`` on
stderr and exit code 2. Results go to stdout (for ``extract``, the cache path is the last line),
progress and notes to stderr.
"""

from __future__ import annotations

import json
import sys

import click

from featprobe import __version__
from featprobe.errors import FeatprobeError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FeatprobeError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; rerun the same command to resume", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="featprobe")
def main():
    """Extract frozen-backbone features once; fit and compare heads on them many times.

    \b
    featprobe extract data/train.csv --images data/images   # -> cache/vgg16-<key>.h5
    featprobe fit cache/vgg16-<key>.h5 --head logreg        # seconds, recorded in runs.jsonl
    featprobe baseline data/train.csv                        # the end-to-end CNN benchmark
    featprobe compare                                        # one table of every run
    """


def _csv_list(value: str | None) -> list[str] | None:
    return [x.strip() for x in value.split(",") if x.strip()] if value else None


_cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where caches and runs.jsonl live (default: $FEATPROBE_CACHE or ./cache).",
)


@main.command()
@click.argument("data", type=click.Path())
@click.option("--images", type=click.Path(),
              help="Image folder for a CSV (default: images/ beside it).")
@click.option("--image-col", help="CSV column with image file names (auto-detected).")
@click.option("--label-col", help="CSV column with labels (auto-detected for two columns).")
@click.option("--backbone", default="vgg16", show_default=True,
              help="Registered backbone or any torchvision classification model name.")
@click.option("--weights", default="DEFAULT", show_default=True,
              help="DEFAULT, a torchvision weights name (IMAGENET1K_V1...), none, "
              "or a state-dict path.")
@click.option("--layers", help="Comma-separated layers, e.g. pool5,fc7 (default: the backbone's).")
@_cache_dir_option
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--batch-size", type=click.IntRange(1),
              help="Images per batch (default: 256 GPU, 16 CPU).")
@click.option("--workers", type=click.IntRange(0), help="DataLoader worker processes.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="Unreadable image: stop naming it, or record it in /bad and go on.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="Storage type of the features.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              show_default=True, help="Compute precision (auto: bf16 on CUDA, fp32 on CPU).")
@click.option("--image-size", type=int, help="Crop size instead of the weights' own (e.g. 224).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def extract(data, images, image_col, label_col, backbone, weights, layers, cache_dir, device,
            batch_size, workers, on_error, dtype, precision, image_size, quiet):
    """Run a frozen backbone over every image of DATA once and cache the features.

    DATA is a CSV of image names and labels (the tutorial format: image_names,emergency_or_no)
    or a class-per-folder tree (root/<class>/<image>). The cache file name is content-addressed:
    rerunning the same command returns the finished cache at once, and an interrupted run
    resumes where it stopped. The cache's path is printed last on stdout.
    """
    from featprobe.extraction import extract as run

    cache = run(data, images=images, backbone=backbone, weights=weights, layers=_csv_list(layers),
                cache_dir=cache_dir, device=device, batch_size=batch_size, workers=workers,
                on_error=on_error, dtype=dtype, precision=precision, image_size=image_size,
                image_col=image_col, label_col=label_col, progress=not quiet)
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
    facts = {
        "path": str(c.path),
        "complete": True,
        "rows": len(c),
        "valid": c.n_valid,
        "bad": len(c.bad),
        "classes": c.classes,
        "class_counts": {str(k): int((c.labels[c.valid] == i).sum())
                         for i, k in enumerate(c.classes)},
        "layers": {k: {"shape": list(c.shapes[k]), "dtype": str(c.dtypes[k])} for k in c.layers},
        **{k: v for k, v in c.meta.items() if k not in ("layers", "complete", "n_valid")},
    }
    if as_json:
        click.echo(json.dumps(facts, indent=1, default=str))
        return
    for key in ("path", "complete", "rows", "valid", "bad", "classes", "class_counts"):
        click.echo(f"{key:20} {facts[key]}")
    click.echo("layers")
    for k, v in facts["layers"].items():
        click.echo(f"  {k:18} {tuple(v['shape'])} {v['dtype']}")
    for key, value in sorted(c.meta.items()):
        if key not in ("layers", "complete", "n_valid"):
            click.echo(f"{key:20} {json.dumps(value) if not isinstance(value, str) else value}")
    for image_id, reason in c.bad[:10]:
        click.echo(f"bad: {image_id}: {reason}")


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
    from featprobe.backbones import classification_models, describe

    for b in describe():
        layers = ", ".join(f"{k} ({v})" for k, v in b["layers"].items())
        click.echo(f"{b['name']:14} {layers}   default: {','.join(b['default_layers'])}")
    click.echo("also, with layer 'penultimate' (input of the final Linear) or a module path: "
               + ", ".join(m for m in classification_models()), err=False)


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
    from featprobe.weights import add_checkpoint

    click.echo(str(add_checkpoint(file, backbone)))


def run() -> None:  # pragma: no cover - console entry for python -m featprobe
    main(prog_name="featprobe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
