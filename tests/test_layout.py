"""The package's shape, as docs/architecture.md states it: the two stages as sub-packages, no
import cycle (imports inside functions count), lower layers never importing higher ones, no
module over 500 lines, the package under 6,000, public torch and torchvision APIs only."""

import re

from layout import PACKAGE, cycles, graph, lines, modules

# Lower layers first; a module may import its own layer or lower ones only.
# The root package sits at the bottom: its __init__ holds __version__ and imports lazily.
LAYERS = [
    {"featprobe", "featprobe.errors", "featprobe.plain", "featprobe.faults", "featprobe.files",
     "featprobe.policy"},
    {"featprobe.data", "featprobe.splits"},
    {"featprobe.cache"},
    {"featprobe.runs"},
    {"featprobe.extraction", "featprobe.probe"},
    {"featprobe.prediction", "featprobe.cnn_baseline", "featprobe.heads", "featprobe.reporting"},
    {"featprobe.cli", "featprobe.demo", "featprobe.__main__"},
]


def _layer(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if module in layer or any(module.startswith(m + ".") for m in layer - {"featprobe"}):
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS")


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_lower_layers_never_import_higher_ones():
    g = graph()
    upward = [(a, b) for a, bs in g.items() for b in bs
              if _layer(b) > _layer(a) and not b.startswith(a + ".")]
    assert upward == []


def test_the_stages_do_not_import_each_other():
    g = graph()
    crossing = [(a, b) for a, bs in g.items() for b in bs
                if {a.split(".")[1:2][0] if "." in a else "", b.split(".")[1:2][0]
                    if "." in b else ""} == {"extraction", "probe"}]
    assert crossing == []


# The package's line budget: a ratchet against bloat, raised only by a feature that says so.
BUDGET = {
    "redesign (issue 13): 7,019 -> at most 6,000, nothing lost": 6000,
    "nothing read is trusted (issue 14): safe unpickling, checksummed reads, parts stamped with "
    "their extraction, whole run records, record types, head digests and checks, file "
    "identity, devices, one-class data, resize bounds": 260,
    "cli.py split into cli/ (app, one module of commands per stage) so commands can grow": 50,
    "honest comparisons (issue 15): selection on an inner split, --seeds and run keys, intervals "
    "and paired tests, the k-NN head, few-shot curves, l2 normalisation, any sklearn classifier, "
    "predict's training-image warning, val predictions in run records": 926,
    "featprobe report (issue 17): one self-contained HTML page (table, charts, curves, the best "
    "head refitted: per-class metrics, confusion matrix, misclassified thumbnails, provenance) "
    "and its headless-Chromium renderer (screenshots, console/network checks)": 964,
    "timm and open_clip plug-in backbones, token layers, --crop, --preprocess-like, a "
    "torchvision entry's own file, weights resolved before writing (issues 16, 19.2, 19.5)": 511,
    "a newcomer's first hour (issue 19): --dtype auto, degenerate features flagged by fit and "
    "compare, output folders made before the work, predict keeps predictions.csv, shard and "
    "out-of-core bars, the CNN's convergence warning, prepare_data(str)": 108,
    "issue 15, finished: the C grid walked until 2 points in a row score below the best (svm "
    "--sweep on the demo's features 148 s -> 13 s), a fit's ConvergenceWarnings said in one line "
    "and recorded as converged": 62,
    "review, net: one copy each of 'random_state defaults to the run's seed' (fit, curve), the "
    "params asked (run key, record), a predicted class's probability (fit, report) and the val "
    "outputs' decoder (now beside its encoder); predict marks training images when unlabelled": 2,
}


def test_sizes():
    sizes = {name: lines(path) for name, path in modules().items()}
    assert max(sizes.values()) <= 500, max(sizes.items(), key=lambda kv: kv[1])
    assert sum(sizes.values()) <= sum(BUDGET.values())


def test_public_torch_apis_only():
    private = re.compile(r"\b(torch|torchvision)(\.\w+)*\._(?!_)")
    offenders = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if private.search(line)]
    assert offenders == []


def test_test_machinery_is_not_in_the_package():
    text = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    for needle in ("os.fork(", "setrlimit", "os.setuid", "import fcntl"):
        assert needle not in text
