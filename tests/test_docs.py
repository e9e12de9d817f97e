"""Every command and Python snippet in README.md and docs/*.md runs, as written, in order.

Each doc's fenced ```bash / ```console / ```python blocks run top to bottom in one temporary
folder (a later block may use an earlier one's files and shell variables), after the
changes declared in tests/doc_substitutions.py, the one place where the docs tests differ
from the docs (small real data, weights that exist offline). ```text blocks are not run; a
fence without a language fails, so nothing escapes by accident. A block may opt out only with
``<!-- doc-test: skip (reason) -->`` on the line before its fence; the skips are listed by
``test_skipped_blocks_say_why``. ``featprobe`` on PATH is a shim that has this checkout's CLI
run by tests/docs_server.py (torch imported once), so ``$(featprobe ... | tail -n 1)`` works.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import doc_substitutions as subs
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"bash", "sh", "console", "python"}
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
SKIP = re.compile(r"<!--\s*doc-test:\s*skip\s*(?:\((.*)\))?\s*-->")
BLOCK_TIMEOUT = 240


@dataclass
class Block:
    doc: str
    line: int  # the opening fence's line (1-based)
    lang: str
    text: str
    skip: str | None  # the reason, when the block opts out


def parse(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file (fences may be indented, as in a list)."""
    lines, out, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m[1], m[2], i
        body = []
        i += 1
        while i < len(lines) and not re.match(rf"^{indent}```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        prev = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        skip = SKIP.search(prev)
        out.append(Block(path.name, start + 1, lang, textwrap.dedent("\n".join(body)) + "\n",
                         (skip[1] or "") if skip else None))
        i += 1
    return out


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_every_fence_has_a_language_and_every_skip_a_reason():
    bad = [f"{_name(d)}:{b.line}: fence without a language (```bash / ```python to run it, "
           "```text for output, layouts and diagrams)" for d in DOCS for b in parse(d)
           if not b.lang]
    bad += [f"{_name(d)}:{b.line}: doc-test skip without a reason" for d in DOCS
            for b in parse(d) if b.skip is not None and not b.skip.strip()]
    assert bad == [], "\n".join(bad)


def test_skipped_blocks_say_why(capsys):
    skipped = [f"{_name(d)}:{b.line} ({b.lang}): {b.skip}" for d in DOCS for b in parse(d)
               if b.skip and b.lang in RUN]
    with capsys.disabled():
        print("\ndoc blocks not run:\n  " + "\n  ".join(skipped))
    assert all(s.split(": ", 1)[1] for s in skipped)


def test_every_substitution_still_matches():
    """A substitution whose text left the docs would hide nothing, but would rot."""
    texts = {_name(d): [b.text for b in parse(d) if b.lang in RUN and not b.skip] for d in DOCS}
    stale = [s for s in subs.SUBSTITUTIONS
             if not any(re.search(s.old, t) for name, ts in texts.items()
                        if re.fullmatch(s.doc, name) for t in ts)]
    assert stale == []


@pytest.fixture(scope="session")
def doc_env(tmp_path_factory):
    """The docs server, the ``featprobe``/``python`` shims, the data and the offline weights."""
    base = tmp_path_factory.mktemp("docs")
    sock = str(base / "server.sock")
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "docs_server.py"), sock],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    bin_dir = base / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "featprobe"
    shim.write_text(f"#!{sys.executable} -S\nimport os, sys\n"
                    f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
                    "from docs_server import request\n"
                    f"sys.exit(request({sock!r}, {{'argv': sys.argv[1:], 'cwd': os.getcwd(), "
                    "'env': dict(os.environ)}))\n")
    shim.chmod(0o755)
    python = bin_dir / "python"  # a script, not a link: the venv is found from its path
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    data = base / "data"
    subs.make_data(data)
    env = {**{k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TMPDIR")},
           "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(ROOT),
           "HOME": str(base / "home"), "TORCH_HOME": str(base / "torch"),
           "OMP_NUM_THREADS": "2", "NO_COLOR": "1", "COLUMNS": "100"}
    subs.install_weights(Path(env["TORCH_HOME"]), Path(env["HOME"]))
    yield {"sock": sock, "data": data, "env": env}
    server.terminate()
    server.wait()


def _fail(block: Block, text: str, what: str, out: str, err: str):
    pytest.fail(f"{block.doc}:{block.line} ({block.lang} block) {what}\n--- block as run:\n"
                f"{text}--- stdout (tail):\n{out[-1500:]}\n--- stderr (tail):\n{err[-3000:]}",
                pytrace=False)


def _run_bash(block: Block, text: str, cwd: Path, env: dict):
    script = ("set -eo pipefail\nset -a\n[ -f .doc-env ] && source .doc-env\n"
              "trap 'echo \"doc-test: failed: $BASH_COMMAND\" >&2' ERR\n"
              f"{text}\nexport -p > .doc-env\n")
    if block.lang == "console":  # `$ command` lines run; the rest is output
        script = script.replace(text, "\n".join(ln[2:] for ln in text.splitlines()
                                                if ln.startswith("$ ")) + "\n")
    try:
        p = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        _fail(block, text, f"ran over {BLOCK_TIMEOUT} s", str(e.stdout), str(e.stderr))
    if p.returncode != 0:
        _fail(block, text, f"exited {p.returncode}", p.stdout, p.stderr)


def _run_python(block: Block, text: str, cwd: Path, env: dict, sock: str):
    from docs_server import request

    with open(cwd / ".doc-out", "w+") as out, open(cwd / ".doc-err", "w+") as err, \
            open(os.devnull) as null:
        code = request(sock, {"python": text, "name": f"{block.doc}:{block.line}",
                              "cwd": str(cwd), "env": env},
                       fds=(null.fileno(), out.fileno(), err.fileno()))
        out.seek(0)
        err.seek(0)
        if code != 0:
            _fail(block, text, f"exited {code}", out.read(), err.read())


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_doc_runs_as_written(doc: Path, doc_env, tmp_path):
    blocks = [b for b in parse(doc) if b.lang in RUN and b.skip is None]
    if not blocks:
        pytest.skip(f"{_name(doc)} has no runnable blocks")
    shutil.copytree(doc_env["data"], tmp_path, dirs_exist_ok=True, symlinks=True)
    env = {**doc_env["env"], "DOC_DATA": str(doc_env["data"])}
    for block in blocks:
        text = subs.apply(_name(doc), block.text)
        t0 = time.perf_counter()
        if block.lang == "python":
            _run_python(block, subs.preamble(_name(doc)) + text, tmp_path, env,
                        doc_env["sock"])
        else:
            _run_bash(block, text, tmp_path, env)
        if os.environ.get("DOCS_TIMING"):
            print(f"{block.doc}:{block.line} {time.perf_counter() - t0:.1f}s", file=sys.stderr)
