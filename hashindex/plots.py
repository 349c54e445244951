"""PNG pictures: plots of retrieval metrics (bench/ reports, `hashindex eval --plots`) and contact
sheets of search results (`hashindex query --show`).

Figures are built with :class:`matplotlib.figure.Figure` directly rather than
pyplot, so nothing touches the global backend, opens a window or leaks
figures; saving goes through the Agg renderer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

__all__ = ["contact_sheet", "plot_bars", "plot_grouped_bars", "plot_lines", "plot_pr_curves", "plot_precision_at_n"]


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path


def _axes(title: str, xlabel: str, ylabel: str):
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


# beyond this many series the legend would cover the curves: it moves to the right of the axes, in
# columns of LEGEND_COLUMN_ROWS entries, each widening the figure by LEGEND_COLUMN_INCHES
LEGEND_INSIDE_MAX = 8
LEGEND_COLUMN_ROWS = 24
LEGEND_COLUMN_INCHES = 2.6
LINE_STYLES = ("-", "--", ":", "-.")


def _line_style(i: int) -> dict:
    """Series ``i``'s colour and dash: the 10 default colours, then the same colours dashed, dotted…"""
    return {"color": f"C{i % 10}", "linestyle": LINE_STYLES[i // 10 % len(LINE_STYLES)]}


def _legend(fig: Figure, ax, count: int) -> None:
    """A legend inside the axes for a few series; for many, beside them, the figure widened to hold it."""
    if count == 0:
        return
    if count <= LEGEND_INSIDE_MAX:
        ax.legend()
        return
    columns = -(-count // LEGEND_COLUMN_ROWS)
    fig.set_figwidth(fig.get_figwidth() + LEGEND_COLUMN_INCHES * columns)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="x-small", ncol=columns)


def plot_pr_curves(curves: dict, path, title: str = "Precision-recall (Hamming radius)") -> Path:
    """Plot precision against recall for several methods.

    Parameters
    ----------
    curves : dict of str to dict
        ``{label: pr}`` where ``pr`` has ``'precision'`` and ``'recall'``
        sequences, e.g. the output of :func:`hashindex.metrics.pr_curve`.
    path : str or Path
        Output PNG file; parent directories are created.
    title : str
        Figure title.

    Returns
    -------
    Path
        The written file.
    """
    fig, ax = _axes(title, "recall", "precision")
    for i, (label, pr) in enumerate(curves.items()):
        ax.plot(np.asarray(pr["recall"]), np.asarray(pr["precision"]), marker=".", label=str(label), **_line_style(i))
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02))
    _legend(fig, ax, len(curves))
    return _save(fig, path)


def plot_precision_at_n(curves: dict, path, title: str = "Precision@N") -> Path:
    """Plot precision@N against N (log scale) for several methods.

    Parameters
    ----------
    curves : dict of str to dict
        ``{label: {N: precision}}``, e.g. :func:`hashindex.metrics.precision_at_n`
        output; string keys (after a JSON round trip) are accepted.
    path : str or Path
        Output PNG file; parent directories are created.
    title : str
        Figure title.

    Returns
    -------
    Path
        The written file.
    """
    fig, ax = _axes(title, "N (top returned)", "precision")
    for i, (label, values) in enumerate(curves.items()):
        ns = sorted(values, key=int)
        ax.plot([int(n) for n in ns], [values[n] for n in ns], marker="o", label=str(label), **_line_style(i))
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    _legend(fig, ax, len(curves))
    return _save(fig, path)


def plot_bars(values: dict, path, title: str, ylabel: str) -> Path:
    """Bar chart of one number per method (e.g. mAP per code length).

    Parameters
    ----------
    values : dict of str to float
        ``{label: value}``, drawn in insertion order.
    path : str or Path
        Output PNG file; parent directories are created.
    title, ylabel : str
        Figure title and y-axis label.

    Returns
    -------
    Path
        The written file.
    """
    fig, ax = _axes(title, "", ylabel)
    labels = [str(k) for k in values]
    bars = ax.bar(labels, [float(v) for v in values.values()])
    ax.bar_label(bars, fmt="%.3f")
    if len(labels) > 4:  # slanted, each label ending under its bar
        for tick in ax.get_xticklabels():
            tick.set_rotation(30)
            tick.set_horizontalalignment("right")
            tick.set_rotation_mode("anchor")
    return _save(fig, path)


def plot_lines(series: dict, path, title: str, xlabel: str, ylabel: str, *, logy: bool = False,
               logx: bool = False) -> Path:
    """One line per label through ``{x: y}`` points (e.g. mAP against code length per method).

    Parameters
    ----------
    series : dict of str to dict
        ``{label: {x: y}}``; x values are drawn in sorted order.
    path : str or Path
        Output PNG file; parent directories are created.
    title, xlabel, ylabel : str
    logy, logx : bool
        Logarithmic axes (for times or counts spanning orders of magnitude).
    """
    fig, ax = _axes(title, xlabel, ylabel)
    for i, (label, points) in enumerate(series.items()):
        xs = sorted(points, key=float)
        ax.plot([float(x) for x in xs], [points[x] for x in xs], marker="o", label=str(label), **_line_style(i))
    xs = sorted({float(x) for points in series.values() for x in points})
    if logx:
        ax.set_xscale("log")
    if xs:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        if logx:  # the log scale's minor ticks would crowd the labelled ones
            ax.xaxis.set_minor_locator(NullLocator())
    if logy:
        ax.set_yscale("log")
    _legend(fig, ax, len(series))
    return _save(fig, path)


def plot_grouped_bars(groups: dict, path, title: str, ylabel: str, *, logy: bool = False) -> Path:
    """Bars grouped by the outer key, one colour per inner key: ``{group: {series: value}}``
    (e.g. training time per method, one bar per code length)."""
    fig, ax = _axes(title, "", ylabel)
    names = list(groups)
    series = list(dict.fromkeys(s for values in groups.values() for s in values))
    width = 0.8 / max(len(series), 1)
    for i, s in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(names))]
        ax.bar(xs, [float(groups[n].get(s, np.nan)) for n in names], width, label=str(s))
    ax.set_xticks(range(len(names)), names)
    if logy:
        ax.set_yscale("log")
    _legend(fig, ax, len(series))
    return _save(fig, path)


# ----------------------------------------------------------------------------- contact sheets
SHEET_TILE = 112      # thumbnail square, pixels
SHEET_CAPTION = 30    # two caption lines under each thumbnail
SHEET_PAD = 4


def contact_sheet(rows: list, path) -> Path:
    """A grid of thumbnails with captions: one row per query, its image first, then its results.

    ``rows`` holds, per query, a list of tiles ``(pixels or None, caption lines, is_query)``;
    ``pixels`` is an ``[H, W, 3]`` uint8 array (None: drawn as a grey "no image" tile). Each tile
    is ``SHEET_TILE`` wide and ``SHEET_TILE + SHEET_CAPTION`` high, plus ``SHEET_PAD`` around it;
    the query's frame is blue. Written with Pillow.
    """
    from PIL import Image, ImageDraw, ImageFont

    columns = max((len(r) for r in rows), default=1)
    cell_w, cell_h = SHEET_TILE + 2 * SHEET_PAD, SHEET_TILE + SHEET_CAPTION + 2 * SHEET_PAD
    sheet = Image.new("RGB", (columns * cell_w, max(len(rows), 1) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, tiles in enumerate(rows):
        for c, (pixels, caption, is_query) in enumerate(tiles):
            x, y = c * cell_w + SHEET_PAD, r * cell_h + SHEET_PAD
            if pixels is None:
                draw.rectangle([x, y, x + SHEET_TILE - 1, y + SHEET_TILE - 1], fill=(200, 200, 200))
                draw.text((x + 4, y + SHEET_TILE // 2 - 6), "no image", fill="black", font=font)
            else:
                thumb = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
                scale = SHEET_TILE / max(thumb.size)  # fit the tile, small images scaled up too
                thumb = thumb.resize((max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))),
                                     Image.Resampling.BICUBIC)
                sheet.paste(thumb, (x + (SHEET_TILE - thumb.width) // 2, y + (SHEET_TILE - thumb.height) // 2))
            frame = (30, 90, 220) if is_query else (170, 170, 170)
            width = 3 if is_query else 1  # drawn around the thumbnail, never over it
            draw.rectangle([x - width, y - width, x + SHEET_TILE - 1 + width, y + SHEET_TILE - 1 + width],
                           outline=frame, width=width)
            for line_no, line in enumerate(caption[:2]):
                text = line if draw.textlength(line, font=font) <= SHEET_TILE else "…" + line[-(SHEET_TILE // 7):]
                draw.text((x, y + SHEET_TILE + 3 + 13 * line_no), text, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path
