"""Stage one's commands: extract, info, merge, verify, list, backbones, weights."""

from __future__ import annotations

import json

import click

from featprobe.cli.app import (
    _cache_dir_option,
    _csv_list,
    _data_options,
    _progress,
    _quiet_option,
    main,
)


@main.command()
@click.argument("data", type=click.Path())
@_data_options
@click.option("--backbone", default="vgg16", show_default=True,
              help="A torchvision model name, timm:<model> or open_clip:<architecture> "
              "(see `featprobe backbones`).")
@click.option("--weights", default="DEFAULT", show_default=True, help="DEFAULT, a weights name "
              "(torchvision IMAGENET1K_V1..., a timm or open_clip pretrained tag), none, or a "
              "safetensors/state-dict path.")
@click.option("--crop", type=click.Choice(["center", "squash", "letterbox"]), default="center",
              show_default=True, help="center: the weights' own resize and centre crop; squash: "
              "the whole image resized to the input size; letterbox: fitted inside and padded.")
@click.option("--preprocess-like", metavar="WEIGHTS", help="With --weights none or a file that "
              "is not a published torchvision file: use this weights entry's transform "
              "(default: DEFAULT's).")
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
@click.option("--dtype", type=click.Choice(["auto", "float16", "float32"]), default="auto",
              show_default=True, help="Storage type of the features (auto: float16, or "
              "float32 for --weights none, whose small values float16 would round to 0).")
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
def extract(data, images, image_col, label_col, allow_outside_images, backbone, weights, crop,
            preprocess_like, layers, cache_dir, device, batch_size, workers, on_error, dtype,
            precision, decode, image_size, shard, quiet):
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
                decode=decode, allow_outside_images=allow_outside_images, crop=crop,
                preprocess_like=preprocess_like)
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
@click.argument("name", required=False)
def backbones(name):
    """List registered backbones and their layers (any torchvision model name works too), or
    one backbone's layers and dims: `featprobe backbones timm:vit_small_patch16_224`."""
    from featprobe.extraction.backbones import PLUGINS, classification_models, describe

    for b in describe(name):
        layers = ", ".join(f"{k} ({v})" for k, v in b["layers"].items())
        click.echo(f"{b['name']:14} {layers}   default: {','.join(b['default_layers'])}")
        if "preprocessing" in b:
            click.echo(f"{'':14} preprocessing ({b['library']} {b['library_version']}): "
                       f"{json.dumps(b['preprocessing'])}")
    if name is None:
        click.echo("also, with layer 'penultimate' (input of the final Linear) or a module path: "
                   + ", ".join(m for m in classification_models()))
        click.echo("plug-ins (optional extras featprobe[timm], featprobe[clip]):")
        for text in PLUGINS.values():
            click.echo(f"  {text}")


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
