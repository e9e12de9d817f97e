"""``featprobe report``: the runs of a cache directory as one self-contained HTML page."""

from __future__ import annotations

import click

from featprobe.cli.app import main


@main.command("report")
@click.argument("directory", required=False, type=click.Path())
@click.option("--out", "-o", type=click.Path(dir_okay=False),
              help="HTML file to write (default: report.html in DIRECTORY).")
@click.option("--images", type=click.Path(file_okay=False),
              help="Where the cached images are now, if moved since extraction (thumbnails).")
@click.option("--max-thumbnails", type=click.IntRange(min=0), default=24, show_default=True,
              help="Misclassified val images shown, most confident first.")
@click.option("--no-refit", is_flag=True,
              help="Do not refit the best head (no per-class figures or thumbnails).")
def report_command(directory, out, images, max_thumbnails, no_refit):
    """Write one self-contained HTML report of DIRECTORY's runs (default: $FEATPROBE_CACHE or
    ./cache): comparison table, accuracy chart, few-shot curves, the best head's per-class
    metrics, confusion matrix and misclassified images, and what was compared. Prints its path.
    """
    from featprobe.reporting import report

    path = report(directory, out, images=images, refit=not no_refit,
                  max_thumbnails=max_thumbnails)
    click.echo(str(path))
