"""The extraction stage: a frozen backbone runs over every image once, into an HDF5 cache.

:func:`extract` validates the dataset, works out the cache's content-addressed name and either
returns the finished cache, resumes an interrupted one, or streams a new one
(:mod:`featprobe.extraction.stream`). An identical rerun is answered from a small request index
without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from featprobe import __version__
from featprobe.cache import FORMAT_VERSION, FeatureCache, PartialCache, default_cache_dir
from featprobe.cache.integrity import merge
from featprobe.data import Dataset, load_dataset, require_two_classes
from featprobe.errors import FeatprobeError
from featprobe.extraction import sharding
from featprobe.extraction.settings import ExtractJob, ExtractSettings
from featprobe.faults import crash_point
from featprobe.files import atomic_write
from featprobe.policy import CROPS, DECODES, DTYPES

ON_ERROR = ("fail", "skip")
REQUESTS = ".requests"  # request hash -> cache file name, for the torch-free rerun
log = logging.getLogger("featprobe")


def cache_name(backbone: str, config: dict) -> tuple[str, str]:
    """Content-addressed: every input that changes the features changes the name (a plug-in's
    ``timm:`` becomes ``timm-``: no colon in file names)."""
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return f"{re.sub(r'[^A-Za-z0-9._-]', '-', backbone)}-{key[:16]}", key


def extract(
    data: str | os.PathLike | Dataset, images: str | os.PathLike | None = None,
    backbone: str = "vgg16", weights: str | os.PathLike | None = "DEFAULT",
    layers: list[str] | tuple[str, ...] | str | None = None,
    cache_dir: str | os.PathLike | None = None, device: str = "auto",
    batch_size: int | None = None, workers: int | None = None, on_error: str = "fail",
    dtype: str = "auto", precision: str = "auto", image_size: int | None = None,
    image_col: str | None = None, label_col: str | None = None, progress: bool = True,
    shard: str | tuple[int, int] | None = None, decode: str = "auto",
    allow_outside_images: bool = False, crop: str = "center", preprocess_like: str | None = None,
) -> FeatureCache | None:
    """Extract features of ``layers`` for every image of ``data`` into an HDF5 cache.

    Returns the complete :class:`FeatureCache`. An identical earlier run's cache is returned at
    once (the model is not built); an interrupted one is resumed.

    ``shard="i/n"`` computes only shard ``i`` of ``n`` (independent jobs such as SLURM arrays):
    the shard that finds every part written merges them and returns the cache, the others return
    ``None``. Under ``torchrun`` the ranks are the shards and every rank returns the cache.

    ``decode``: ``cpu`` (PIL in DataLoader workers), ``gpu`` (JPEGs decoded on the device,
    :mod:`featprobe.extraction.gpu_decode`) or ``auto`` (:func:`featprobe.policy.resolve_decode`).
    Not in the cache key (the paths agree within a stated tolerance); the cache records it.

    Image names that leave the image folder (``../x.jpg``, an absolute path) are refused unless
    ``allow_outside_images``; two names of one file are refused always.

    ``backbone``: a torchvision name, ``timm:<model>`` or ``open_clip:<architecture>``.
    ``crop``: ``center`` (the weights' own transform), ``squash`` or ``letterbox``.
    ``preprocess_like``: for ``weights`` none or a file, the torchvision weights entry whose
    transform to use (default: DEFAULT's).
    """
    if isinstance(layers, str):
        layers = [x.strip() for x in layers.split(",") if x.strip()]
    settings = ExtractSettings(backbone, weights, tuple(layers) if layers else None, device,
                               batch_size, workers, on_error, dtype, precision, image_size,
                               decode, progress, crop, preprocess_like)
    shard = sharding.resolve(shard)
    _check(settings)
    ds = data if isinstance(data, Dataset) else load_dataset(
        data, images, image_col, label_col, allow_outside=allow_outside_images)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return run_extract(ds, settings, directory, shard)


def _check(s: ExtractSettings) -> None:
    for option, value, allowed in (("--on-error", s.on_error, ON_ERROR),
                                   ("--dtype", s.dtype, DTYPES), ("--decode", s.decode, DECODES),
                                   ("--crop", s.crop, CROPS)):
        if value not in allowed:
            raise FeatprobeError(f"{option} must be {', '.join(allowed[:-1])} or {allowed[-1]}, "
                                 f"got {value!r}")


def run_extract(ds: Dataset, s: ExtractSettings, directory: Path,
                shard: sharding.Shard) -> FeatureCache | None:
    """:func:`extract` once its arguments are settings: reuse, resume or stream the cache."""
    if ds.labels is None:
        raise FeatprobeError("extract needs labelled images (a CSV with labels, or a folder tree)")
    require_two_classes(ds)
    fingerprint = ds.fingerprint()
    request = _request_key(s, fingerprint)
    known = _lookup(directory, request, fingerprint)
    if known is not None:
        return _reuse(known, s.on_error)

    job = _resolve(ds, s, directory, shard, fingerprint)  # imports torch and torchvision
    final = job.partial.final
    if final.exists():
        # parts left by a run killed between the final rename and their removal
        shutil.rmtree(job.partial.dir, ignore_errors=True)
        _remember(directory, request, final)
        return _reuse(final, s.on_error)
    from featprobe.extraction.backbones import with_network
    job = replace(job, model=with_network(job.model))  # weights missing: fail before writing
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FeatprobeError(f"cannot create cache directory {directory}: {e.strerror}") from None

    def waiting():
        log.info(f"another featprobe extract is writing {final.name}; waiting for it")

    if shard.whole:
        with job.partial.locked(on_wait=waiting):
            if final.exists():  # the other writer finished it
                return _reuse(final, s.on_error)
            _, builder = _write_parts(job, incremental=True)
            job.partial.finish(builder)
    elif _extract_shard(job, waiting) is None:
        return None
    _remember(directory, request, final)
    return _reuse(final, s.on_error)


def _resolve(ds: Dataset, s: ExtractSettings, directory: Path, shard: sharding.Shard,
             fingerprint: str) -> ExtractJob:
    """Resolve the model, device, precision and decode path; name the cache."""
    from featprobe.extraction.backbones import resolve_model
    from featprobe.policy import (
        default_workers,
        resolve_decode,
        resolve_device,
        resolve_dtype,
        resolve_precision,
    )

    model = resolve_model(s.backbone, s.weights, s.layers, s.image_size, s.crop,
                          s.preprocess_like, build=False)
    like = (model.provenance or {}).get("preprocess_like")
    if like and s.preprocess_like is None and model.weights.kind == "file":
        log.info(f"{s.weights} is not a published torchvision file: preprocessing as "
                 f"{s.backbone}'s {like} weights (--preprocess-like chooses another)")
    dev = resolve_device(sharding.device_for(shard, s.device))
    prec = resolve_precision(s.precision, dev)
    workers = s.workers
    if workers is None and shard.local_count > 1 and dev.type == "cuda":
        workers = max(1, default_workers(dev) // shard.local_count)  # ranks share the cores
    dtype = resolve_dtype(s.dtype, model.weights.kind)
    config = {"format_version": FORMAT_VERSION, "backbone": s.backbone,
              "weights": model.weights.identity, "layers": list(model.layers),
              "preprocessing": model.preprocessing, "dtype": dtype, "precision": prec,
              "dataset_fingerprint": fingerprint}
    name, key = cache_name(s.backbone, config)
    # the GPU decoder centre-crops only
    decode = resolve_decode(s.decode, dev, workers) if s.crop == "center" else "cpu"
    return ExtractJob(ds, model, dev, prec, dtype, s.on_error, decode, workers, s.batch_size,
                      s.progress,
                      shard, PartialCache(directory / (name + ".h5")), config, key)


def _extract_shard(job: ExtractJob, waiting) -> FeatureCache | None:
    """One shard's parts; then the last shard (or torchrun's rank 0 after a barrier) merges."""
    shard, partial = job.shard, job.partial
    group = sharding.ProcessGroup(shard, job.device.type)
    try:
        with partial.locked(on_wait=waiting, name=f"lock-shard-{shard.index}-of-{shard.count}"):
            quiet = shard.torchrun and shard.index != 0
            n_parts, _ = _write_parts(replace(job, progress=job.progress and not quiet))
        group.barrier()  # torchrun: every rank's parts are on disk past this line
        if shard.torchrun:
            if shard.index == 0:
                merge(partial.final, on_wait=waiting)
            group.barrier()
            return FeatureCache(partial.final)
        missing = partial.missing_parts(n_parts) if not partial.final.exists() else []
        if missing:
            log.info(f"shard {shard} done; {len(missing)} of {n_parts} parts are still to come "
                     "from other shards. When they finish, the last one merges; or run: "
                     f"featprobe merge {partial.final}")
            return None
        return merge(partial.final, on_wait=waiting)
    finally:
        group.close()


def _write_parts(job: ExtractJob, incremental: bool = False):
    """Compute this shard's missing parts; return ``(parts in all, builder)``. ``incremental``
    (one writer for the whole dataset): copy parts into the final HDF5 file as they are written,
    ``builder`` being the unfinished :class:`~featprobe.cache.H5Builder` (else None)."""
    import torch
    import torchvision

    from featprobe.extraction.stream import run_parts
    from featprobe.extraction.weights import weights_sha256
    from featprobe.policy import default_batch_size

    partial, shard, choice, ds = job.partial, job.shard, job.model.weights, job.ds
    facts = dict(job.model.provenance or {})  # library, version, model name, preprocess_like
    hub_sha = facts.pop("weights_sha256", None)
    part_rows = partial.manifest(job.config, job.batch_size or default_batch_size(job.device),
                                 len(ds))["part_rows"]
    if job.batch_size and job.batch_size != part_rows:
        log.info(f"resuming with the batch size this cache began with ({part_rows})")
    n_parts = partial.n_parts()
    mine = shard.parts(n_parts)
    done = partial.done_parts()
    todo = [k for k in mine if k not in done]
    if len(todo) < len(mine):
        what = "batches" if shard.whole else f"batches of shard {shard}"
        log.info(f"resuming {partial.final.name}: {len(mine) - len(todo)}/{len(mine)} {what} "
                 "already done")
    dev = job.device
    attrs = {
        **{k: v for k, v in job.config.items() if k != "weights"},
        "weights": choice.name if choice.kind != "file" else "file", "weights_id": choice.identity,
        "weights_file": choice.name if choice.kind == "file" else choice.path,
        "weights_sha256": weights_sha256(choice) or hub_sha or "", "cache_key": job.key, **facts,
        "featprobe_version": __version__, "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "decode": job.decode,  # not in the cache key: cpu and gpu agree within docs' tolerance
        "source": ds.source, "images_root": str(ds.root),  # predict: which images were trained on
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    partial.save_dataset(ds.ids, ds.labels, ds.classes, attrs)
    builder = partial.builder() if incremental else None
    try:
        if todo:
            run_parts(job, part_rows, todo, builder=builder, mine=mine)
    except BaseException:
        if builder is not None:
            builder.abort()
        raise
    return n_parts, builder


def _gpu_visible() -> bool:
    """Whether an NVIDIA GPU could be visible, without importing torch (for the request key)."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    return os.path.exists("/dev/nvidiactl") and cvd not in ("", "-1")


def _request_key(s: ExtractSettings, fingerprint: str) -> str:
    """What the user asked for, hashed without torch (a weights file by path, size and mtime;
    torchvision's version, as ``DEFAULT`` may change). Any doubt only costs a slow path."""
    w = str(s.weights)
    if w.lower() != "none" and Path(w).expanduser().is_file():
        st = Path(w).expanduser().stat()
        w = f"{Path(w).expanduser().resolve()}:{st.st_size}:{st.st_mtime_ns}"
    try:
        tv = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        tv = "?"
    layers = list(s.layers) if s.layers else None
    facts = [FORMAT_VERSION, __version__, tv, s.backbone, w, layers, s.image_size, s.dtype,
             s.precision, s.device, _gpu_visible() if "auto" in (s.device, s.precision) else None,
             fingerprint]
    if s.crop != "center" or s.preprocess_like is not None:  # center keeps earlier requests' keys
        facts += [s.crop, s.preprocess_like]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:32]


def _lookup(directory: Path, request: str, fingerprint: str) -> Path | None:
    try:
        name = (directory / REQUESTS / request).read_text().strip()
    except OSError:
        return None
    final = directory / name
    if "/" in name or not final.is_file():
        return None
    try:
        if FeatureCache(final).meta.get("dataset_fingerprint") != fingerprint:
            return None
    except FeatprobeError:
        return None
    return final


def _remember(directory: Path, request: str, final: Path) -> None:
    crash_point("extract.remember")
    try:
        (directory / REQUESTS).mkdir(exist_ok=True)
        with atomic_write(directory / REQUESTS / request, "w",
                          crash="request.tmp_written") as f:
            f.write(final.name + "\n")
    except OSError:
        pass  # only a shortcut; the slow path finds the same cache


def _reuse(final: Path, on_error: str) -> FeatureCache:
    cache = FeatureCache(final)
    if on_error == "fail" and cache.bad:
        image_id, reason = cache.bad[0]
        raise FeatprobeError(f"{final.name} was made with --on-error skip and has "
                             f"{len(cache.bad)} bad image(s), first {image_id}: {reason}; pass "
                             "--on-error skip to use it")
    return cache


