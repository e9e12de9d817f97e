"""The extraction stage: a frozen backbone runs over every image once, into an HDF5 cache.

:func:`extract` validates the dataset, works out the cache's content-addressed name and either
returns the finished cache, resumes an interrupted one, or streams a new one
(:mod:`featprobe.stream`). An identical rerun is answered from a small request index without
importing torch, so it costs a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from featprobe import __version__
from featprobe.cache import FORMAT_VERSION, FeatureCache, PartialCache, default_cache_dir
from featprobe.data import Dataset, load_dataset
from featprobe.errors import FeatprobeError
from featprobe.faults import crash_point

DTYPES = ("float16", "float32")
ON_ERROR = ("fail", "skip")
DECODES = ("auto", "cpu", "gpu")  # featprobe.decoding.DECODES, without importing torch
REQUESTS = ".requests"  # request hash -> cache file name, for the torch-free rerun


def cache_name(backbone: str, config: dict) -> tuple[str, str]:
    """Content-addressed: every input that changes the features changes the name."""
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return f"{backbone}-{key[:16]}", key


def extract(
    data: str | os.PathLike | Dataset,
    images: str | os.PathLike | None = None,
    backbone: str = "vgg16",
    weights: str | os.PathLike | None = "DEFAULT",
    layers: list[str] | tuple[str, ...] | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    on_error: str = "fail",
    dtype: str = "float16",
    precision: str = "auto",
    image_size: int | None = None,
    image_col: str | None = None,
    label_col: str | None = None,
    progress: bool = True,
    shard: str | tuple[int, int] | None = None,
    decode: str = "auto",
) -> FeatureCache | None:
    """Extract features of ``layers`` for every image of ``data`` into an HDF5 cache.

    Returns the complete :class:`FeatureCache`. An identical earlier run's cache is returned at
    once (the model is not built); an interrupted one is resumed.

    ``shard="i/n"`` computes only shard ``i`` of ``n`` (for independent jobs such as SLURM
    arrays; see :mod:`featprobe.sharding`). The shard that finds every part written merges them
    and returns the cache; the others return ``None`` (``featprobe merge`` also consolidates).
    Under ``torchrun`` the ranks are the shards and every rank returns the cache.

    ``decode``: ``cpu`` (PIL in DataLoader workers), ``gpu`` (JPEGs decoded on the device, see
    :mod:`featprobe.decoding`; on a CPU device the same tensor path runs on CPU) or ``auto``
    (``gpu`` on CUDA). It does not enter the cache key (the features agree within a stated
    tolerance); the cache's ``decode`` attribute records which path made it.
    """
    from featprobe import sharding

    shard = sharding.resolve(shard)
    if on_error not in ON_ERROR:
        raise FeatprobeError(f"--on-error must be fail or skip, got {on_error!r}")
    if dtype not in DTYPES:
        raise FeatprobeError(f"--dtype must be float16 or float32, got {dtype!r}")
    if decode not in DECODES:
        raise FeatprobeError(f"--decode must be auto, cpu or gpu, got {decode!r}")
    if isinstance(layers, str):
        layers = [x.strip() for x in layers.split(",") if x.strip()]
    ds = data if isinstance(data, Dataset) else load_dataset(data, images, image_col, label_col)
    if ds.labels is None:
        raise FeatprobeError("extract needs labelled images (a CSV with labels, or a folder tree)")
    fingerprint = ds.fingerprint()
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    request = _request_key(backbone, weights, layers, image_size, dtype, precision, device,
                           fingerprint)
    known = _lookup(directory, request, fingerprint)
    if known is not None:
        return _reuse(known, on_error)

    # a new request: resolve everything (this imports torch and torchvision)
    from featprobe.backbones import preprocessing, resolve_layers, resolve_weights
    from featprobe.decoding import resolve_decode
    from featprobe.stream import default_workers, resolve_device, resolve_precision

    layers = resolve_layers(backbone, layers)
    choice = resolve_weights(backbone, weights)
    pre = preprocessing(backbone, choice, image_size)
    dev = resolve_device(sharding.device_for(shard, device))
    prec = resolve_precision(precision, dev)
    if workers is None and shard.local_count > 1 and dev.type == "cuda":
        workers = max(1, default_workers(dev) // shard.local_count)  # ranks share the cores
    decode = resolve_decode(decode, dev, workers)
    config = {
        "format_version": FORMAT_VERSION,
        "backbone": backbone,
        "weights": choice.identity,
        "layers": layers,
        "preprocessing": pre,
        "dtype": dtype,
        "precision": prec,
        "dataset_fingerprint": fingerprint,
    }
    name, key = cache_name(backbone, config)
    final = directory / (name + ".h5")
    if final.exists():
        # parts left by a run killed between the final rename and their removal
        shutil.rmtree(PartialCache(final).dir, ignore_errors=True)
        _remember(directory, request, final)
        return _reuse(final, on_error)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FeatprobeError(f"cannot create cache directory {directory}: {e.strerror}") from None
    partial = PartialCache(final)

    def waiting():
        print(f"another featprobe extract is writing {final.name}; waiting for it", file=sys.stderr)

    if shard.whole:
        with partial.locked(on_wait=waiting):
            if final.exists():  # the other writer finished it
                return _reuse(final, on_error)
            _, builder = _write_parts(ds, backbone, choice, layers, pre, dev, prec, dtype,
                                      on_error, partial, config, key, batch_size, workers,
                                      progress, shard, decode=decode, incremental=True)
            partial.finish(builder)
    else:
        cache = _extract_shard(ds, backbone, choice, layers, pre, dev, prec, dtype, on_error,
                               partial, config, key, batch_size, workers, progress, shard, waiting,
                               decode=decode)
        if cache is None:
            return None
    _remember(directory, request, final)
    return _reuse(final, on_error)


def _extract_shard(ds, backbone, choice, layers, pre, dev, prec, dtype, on_error, partial, config,
                   key, batch_size, workers, progress, shard, waiting,
                   decode="cpu") -> FeatureCache | None:
    """One shard's parts; then the last shard (or torchrun's rank 0 after a barrier) merges."""
    from featprobe.cache import merge
    from featprobe.sharding import ProcessGroup

    group = ProcessGroup(shard, dev.type)
    try:
        with partial.locked(on_wait=waiting, name=f"lock-shard-{shard.index}-of-{shard.count}"):
            n_parts, _ = _write_parts(ds, backbone, choice, layers, pre, dev, prec, dtype,
                                      on_error, partial, config, key, batch_size, workers,
                                      progress and (not shard.torchrun or shard.index == 0),
                                      shard, decode=decode)
        group.barrier()  # torchrun: every rank's parts are on disk past this line
        if shard.torchrun:
            if shard.index == 0:
                merge(partial.final, on_wait=waiting)
            group.barrier()
            return FeatureCache(partial.final)
        missing = partial.missing_parts(n_parts) if not partial.final.exists() else []
        if missing:
            print(f"shard {shard} done; {len(missing)} of {n_parts} parts are still to come from "
                  f"other shards. When they finish, the last one merges; or run: featprobe merge "
                  f"{partial.final}", file=sys.stderr)
            return None
        return merge(partial.final, on_wait=waiting)
    finally:
        group.close()


def _write_parts(ds, backbone, choice, layers, pre, dev, prec, dtype, on_error, partial, config,
                 key, batch_size, workers, progress, shard, decode="cpu", incremental=False):
    """Compute this shard's parts that are still missing; return ``(parts in all, builder)``.

    ``incremental`` (one writer for the whole dataset): copy parts into the final HDF5 file as
    they are written; ``builder`` is then the unfinished :class:`~featprobe.cache.H5Builder`
    (else None)."""
    import torch
    import torchvision

    from featprobe.backbones import weights_sha256
    from featprobe.stream import default_batch_size, run_parts

    manifest = partial.manifest(config, batch_size or default_batch_size(dev), len(ds))
    part_rows = manifest["part_rows"]
    if batch_size and batch_size != part_rows:
        print(f"resuming with the batch size this cache began with ({part_rows})", file=sys.stderr)
    n_parts = -(-len(ds) // part_rows)
    mine = shard.parts(n_parts)
    done = partial.done_parts()
    todo = [k for k in mine if k not in done]
    if len(todo) < len(mine):
        what = "batches" if shard.whole else f"batches of shard {shard}"
        print(f"resuming {partial.final.name}: {len(mine) - len(todo)}/{len(mine)} {what} "
              "already done", file=sys.stderr)
    attrs = {
        **{k: v for k, v in config.items() if k != "weights"},
        "weights": choice.name if choice.kind != "file" else "file",
        "weights_id": choice.identity,
        "weights_file": choice.name if choice.kind == "file" else "",
        "weights_sha256": weights_sha256(choice) or "",
        "cache_key": key,
        "featprobe_version": __version__,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "decode": decode,  # not in the cache key: cpu and gpu agree within docs' tolerance
        "source": ds.source,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    partial.save_dataset(ds.ids, ds.labels, ds.classes, attrs)
    builder = partial.builder() if incremental else None
    try:
        if todo:
            run_parts(ds, backbone, choice, layers, pre, dev, prec, dtype, on_error, partial,
                      part_rows, todo, workers, progress, decode=decode, builder=builder)
    except BaseException:
        if builder is not None:
            builder.abort()
        raise
    return n_parts, builder


def _gpu_visible() -> bool:
    """Whether an NVIDIA GPU could be visible, without importing torch (for the request key)."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    return os.path.exists("/dev/nvidiactl") and cvd not in ("", "-1")


def _request_key(backbone, weights, layers, image_size, dtype, precision, device,
                 fingerprint) -> str:
    """What the user asked for, hashed without torch. Maps to the cache it produced.

    A local weights file enters by path, size and mtime; torchvision's version enters because
    ``DEFAULT`` may mean other weights in another release. Any doubt only costs a slow path.
    """
    w = str(weights)
    if w.lower() != "none" and Path(w).expanduser().is_file():
        st = Path(w).expanduser().stat()
        w = f"{Path(w).expanduser().resolve()}:{st.st_size}:{st.st_mtime_ns}"
    try:
        tv = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        tv = "?"
    facts = [FORMAT_VERSION, __version__, tv, backbone, w, layers, image_size, dtype, precision,
             device, _gpu_visible() if "auto" in (device, precision) else None, fingerprint]
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
        tmp = directory / REQUESTS / f".{request}.tmp-{os.getpid()}"
        tmp.write_text(final.name + "\n")
        crash_point("request.tmp_written")
        os.replace(tmp, directory / REQUESTS / request)
    except OSError:
        pass  # only a shortcut; the slow path finds the same cache


def _reuse(final: Path, on_error: str) -> FeatureCache:
    cache = FeatureCache(final)
    if on_error == "fail" and cache.bad:
        image_id, reason = cache.bad[0]
        raise FeatprobeError(
            f"{final.name} was made with --on-error skip and has {len(cache.bad)} bad image(s), "
            f"first {image_id}: {reason}; pass --on-error skip to use it"
        )
    return cache


