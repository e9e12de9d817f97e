"""The end-to-end benchmark: a small CNN trained from pixels on the same split as every head. Frozen
features are only worth caching if they beat it; its record sits beside the heads' in
``runs.jsonl``. See docs/baseline.md."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from featprobe.cache import default_cache_dir
from featprobe.data import Dataset, load_dataset, require_two_classes
from featprobe.errors import FeatprobeError, some
from featprobe.extraction.images import ImageRows
from featprobe.extraction.pixels import normalize, pixel_transform, squash
from featprobe.policy import cpu_count, resolve_device
from featprobe.runs.records import (
    append_run,
    compute_metrics,
    correct_mask,
    majority_rate,
    make_record,
)
from featprobe.splits import split

log = logging.getLogger("featprobe")

__all__ = ["BASELINE_DEFAULTS", "CHANNELS", "BaselineSettings", "SmallCNN", "architecture",
           "baseline"]


@dataclass(frozen=True)
class BaselineSettings:
    """How the CNN is trained; the defaults are what ``baseline()`` and the CLI use."""

    image_size: int = 224
    epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    val_fraction: float = 0.1
    device: str = "auto"
    workers: int | None = None


BASELINE_DEFAULTS = asdict(BaselineSettings())
CHANNELS = (25, 50)  # output channels of the two conv blocks


def SmallCNN(n_classes: int, image_size: int,
             channels: tuple[int, int] = CHANNELS) -> nn.Sequential:
    """The benchmark network: 2 x (conv 3x3 -> BatchNorm -> ReLU -> max-pool 2x2) -> Linear, whose
    input is ``channels[1] * (image_size // 4) ** 2`` values."""
    if image_size < 4:
        raise FeatprobeError(f"image_size must be at least 4, got {image_size}")
    c1, c2 = channels
    side = image_size // 2 // 2
    return nn.Sequential(nn.Conv2d(3, c1, kernel_size=3, padding=1), nn.BatchNorm2d(c1),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
                         nn.Conv2d(c1, c2, kernel_size=3, padding=1), nn.BatchNorm2d(c2),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2, 2), nn.Flatten(),
                         nn.Linear(c2 * side * side, n_classes))


def architecture(n_classes: int, image_size: int, channels: tuple[int, int] = CHANNELS) -> str:
    """A one-line summary of :func:`SmallCNN` for the run record's ``params``."""
    c1, c2 = channels
    side = image_size // 2 // 2
    return (f"conv3x3(3->{c1})-bn-relu-maxpool2, conv3x3({c1}->{c2})-bn-relu-maxpool2, "
            f"linear({c2}*{side}*{side}->{n_classes})")


def _workers(workers: int | None) -> int:
    if workers is not None:
        return max(0, int(workers))
    return min(16, cpu_count() or 1)  # nothing else runs while decoding: use every core


def _decode(ds: Dataset, image_size: int, workers: int | None, progress: bool) -> torch.Tensor:
    """Every image of ``ds``, resized, as one uint8 tensor ``N x 3 x S x S``; unreadable files
    raise FeatprobeError (the baseline has no skip mode)."""
    n_workers = _workers(workers)
    rows = ImageRows(ds, pixel_transform(squash(image_size)), image_size)
    loader = torch.utils.data.DataLoader(  # own generator: else it draws seeds from torch's RNG
        rows, batch_size=32, shuffle=False, num_workers=n_workers,
        prefetch_factor=4 if n_workers else None, generator=torch.Generator().manual_seed(0))
    pixels = torch.empty(len(ds), 3, image_size, image_size, dtype=torch.uint8)
    bad: list[str] = []
    with tqdm(total=len(ds), unit="img", desc="baseline: decode", disable=not progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for index, x, reasons in loader:
            pixels[index] = x
            bad += [f"{ds.path(int(i))} ({r})" for i, r in zip(index, reasons) if r]
            bar.update(len(index))
    if bad:
        raise FeatprobeError(
            f"cannot read {len(bad)} image(s): {some(bad, sep='; ')} -- the baseline has no skip "
            "mode: fix or remove them from the dataset")
    return pixels


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> ImageNet mean/std, channels-last (as the model)."""
    return normalize(x, squash(x.shape[-1])).contiguous(memory_format=torch.channels_last)


def _train(model: nn.Module, pixels: torch.Tensor, y: torch.Tensor, rows: np.ndarray,
           epochs: int, batch_size: int, lr: float, seed: int, dev: torch.device,
           progress: bool) -> list[float]:
    """Adam + cross-entropy over ``rows``, shuffled by a seeded generator; mean loss per epoch."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    rows_t = torch.tensor(rows, dtype=torch.int64)  # a copy: Split's arrays are read-only
    losses = []
    for epoch in range(1, epochs + 1):
        model.train()
        order = rows_t[torch.randperm(len(rows_t), generator=gen)]
        total, seen = 0.0, 0
        bar = tqdm(range(0, len(order), batch_size), desc=f"baseline: epoch {epoch}/{epochs}",
                   unit="batch", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        for start in bar:
            idx = order[start:start + batch_size].to(pixels.device)
            xb = _normalise(pixels[idx].to(dev))
            yb = y[idx].to(dev)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        losses.append(total / max(seen, 1))
    return losses


def _predict(model: nn.Module, pixels: torch.Tensor, rows: np.ndarray, dev: torch.device,
             batch_size: int) -> np.ndarray:
    """Predicted class indices for ``rows``, in eval mode (BatchNorm uses running stats)."""
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            idx = torch.tensor(rows[start:start + batch_size], dtype=torch.int64)
            logits = model(_normalise(pixels[idx.to(pixels.device)].to(dev)))
            out.append(logits.argmax(1).cpu())
    return torch.cat(out).numpy() if out else np.empty(0, dtype=np.int64)


def _converged(train_accuracy: float, y_train: np.ndarray, epochs: int) -> bool:
    """False, with a warning, when the CNN does no better on its own training rows than always
    answering their majority class: it has not learnt yet, and its val score says nothing."""
    floor = float(np.bincount(y_train).max() / len(y_train))
    if train_accuracy > floor:
        return True
    log.warning(f"warning: the CNN baseline has not converged: train accuracy "
                f"{100 * train_accuracy:.1f}% is no better than always answering the majority "
                f"class ({100 * floor:.1f}%) after {epochs} epoch(s); train longer (--epochs) or "
                "at a smaller --image-size before comparing its val accuracy")
    return False


def _check_args(image_size, epochs, batch_size, lr) -> None:
    for name, value, low in (("image_size", image_size, 4), ("epochs", epochs, 1),
                             ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise FeatprobeError(f"{name} must be an integer >= {low}, got {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise FeatprobeError(f"lr must be a positive number, got {lr!r}")


def baseline(data: str | Path, images: str | Path | None = None, image_col: str | None = None,
             label_col: str | None = None, image_size: int = 224, epochs: int = 15,
             batch_size: int = 128, lr: float = 1e-3, seed: int = 0, val_fraction: float = 0.1,
             cache_dir: str | Path | None = None, device: str = "auto", workers: int | None = None,
             progress: bool = True, allow_outside_images: bool = False,
             seeds: list[int] | None = None) -> dict | list[dict]:
    """Train the small CNN from pixels on the shared split; append and return its run record.
    ``seed`` picks the split and seeds the initialisation (leaving torch's global RNG alone) and the
    batch order. ``seeds``: one run per seed (the images decoded once), a list of records."""
    _check_args(image_size, epochs, batch_size, lr)
    ds = load_dataset(data, images, image_col, label_col, allow_outside=allow_outside_images)
    require_two_classes(ds)
    for s in seeds or [seed]:  # every split checked before the long work
        split(ds.ids, ds.labels, val_fraction=val_fraction, seed=s)
    dev = resolve_device(device)

    t0 = time.perf_counter()
    pixels = _decode(ds, image_size, workers, progress)
    decode_seconds = time.perf_counter() - t0
    y = torch.as_tensor(ds.labels, dtype=torch.int64)
    if dev.type == "cuda":  # uint8 pixels are small: keep them all on the device
        pixels, y = pixels.to(dev), y.to(dev)
    records = [_train_one(ds, pixels, y, dev, image_size, epochs, batch_size, lr, s, val_fraction,
                          cache_dir, progress, decode_seconds) for s in seeds or [seed]]
    return records if seeds is not None else records[0]


def _train_one(ds, pixels, y, dev, image_size, epochs, batch_size, lr, seed, val_fraction,
               cache_dir, progress, decode_seconds) -> dict:
    s = split(ds.ids, ds.labels, val_fraction=val_fraction, seed=seed)
    n_classes = len(ds.classes)

    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        torch.default_generator.manual_seed(seed)  # the model is built on the CPU
        model = SmallCNN(n_classes, image_size)
    # channels-last: faster than NCHW on the CPU (oneDNN) and with cuDNN
    model = model.to(dev, memory_format=torch.channels_last)

    t0 = time.perf_counter()
    losses = _train(model, pixels, y, s.train, epochs, batch_size, lr, seed, dev, progress)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    fit_seconds = time.perf_counter() - t0

    labels, y_np = list(range(n_classes)), ds.labels
    pred = {part: _predict(model, pixels, rows, dev, batch_size)
            for part, rows in (("train", s.train), ("val", s.val))}
    metrics = {part: compute_metrics(y_np[rows], pred[part], labels)
               for part, rows in (("train", s.train), ("val", s.val))}
    converged = _converged(metrics["train"]["accuracy"], y_np[s.train], epochs)
    params = {"image_size": image_size, "epochs": epochs, "batch_size": batch_size, "lr": lr,
              "optimizer": "adam", "architecture": architecture(n_classes, image_size),
              "device": dev.type}
    record = make_record(
        kind="baseline", cache=None, cache_path=None, dataset_fingerprint=ds.fingerprint(),
        params=params,
        params_set={k: v for k, v in params.items()
                    if k in BASELINE_DEFAULTS and v != BASELINE_DEFAULTS[k] and k != "device"},
        standardize=False, seed=seed, val_fraction=val_fraction, split_hash=s.hash,
        n_train=len(s.train), n_val=len(s.val), n_invalid=0, classes=ds.classes, **metrics,
        fit_seconds=fit_seconds, majority_rate=majority_rate(y_np[s.train], y_np[s.val]),
        decode_seconds=decode_seconds, epoch_losses=losses, converged=converged,
        val_correct=correct_mask(y_np[s.val], pred["val"]))
    append_run(default_cache_dir() if cache_dir is None else cache_dir, record)
    return record
