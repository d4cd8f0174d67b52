"""The run timeline as a picture: throughput over time with every event of the run marked and named.

``plot_timeline(path, run_dir)`` reads a run's JSONL timelines (``eep.runtime.control.metrics``) and
draws, with matplotlib:

- the tokens/s of all ranks together, in bins of ``bin_s``, as steps (a bin is the rate it held);
- one vertical line per event (fault, detection, repair committed, re-replication, restart, rejoin) in its kind's
  colour, named above the plot; names that would overlap are moved to a higher row;
- the end of the run as a line of its own ("end of run"), where the curve stops: the last bin's
  rate is over its own length, so finishing never reads as a drop to zero;
- a legend of the curve and the event kinds, axes in seconds and tokens/s.

matplotlib is imported here only, when a picture is asked for (``pip install "eep[plot]"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eep.runtime.control.metrics import EVENT_KINDS, RunEvent, load_run, run_events, throughput_series

EVENT_STYLE = {  # kind -> (colour, line style)
    "fault": ("#d62728", "-"),
    "detected": ("#9467bd", "--"),
    "repair": ("#ff7f0e", "-"),
    "rereplicated": ("#17becf", "-."),
    "restart": ("#8c564b", ":"),
    "rejoin": ("#2ca02c", "-"),
    "end": ("#333333", "--"),
}
LABEL_ROW_PT = 13  # height of one row of event names above the plot, in points


@dataclass
class TimelinePlot:
    path: Path
    duration_s: float
    peak_tokens_per_s: float
    events: list[RunEvent]


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot_timeline(path: str | Path, run_dir: str | Path, *, title: str, bin_s: float | None = None,
                  end_label: str = "end of run") -> TimelinePlot:
    """Write the timeline of the run in ``run_dir`` to ``path`` (PNG); raises ``PlotUnavailable``
    without matplotlib and ``ValueError`` when the run completed no step.

    ``bin_s``: width of a throughput bin (default: a round value near 1/60 of the run, at least
    50 ms, so a curve over tens of steps per bin reads as a rate, not as step-to-step noise).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError as exc:
        raise PlotUnavailable('matplotlib is not installed: pip install "eep[plot]"') from exc

    launcher, ranks = load_run(run_dir)
    steps = [r for r in ranks if "step" in r and "event" not in r]
    if not steps:
        raise ValueError(f"{run_dir}: no completed step to plot")
    t0, t1 = min(s["t"] for s in steps), max(s["t"] for s in steps)
    duration = t1 - t0
    bin_s = bin_s or next((b for b in (0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0) if b >= duration / 60), 5.0)
    series = throughput_series(steps, t0, t1, bin_s)
    events = [e for e in run_events(launcher, t0) if 0 <= e.t_s <= duration + bin_s]
    marks = events + [RunEvent(duration, "end", end_label)]

    fig, ax = plt.subplots(figsize=(11, 5))
    xs = [t for t, _ in series] + [duration]
    ys = [v for _, v in series]
    ax.fill_between(xs, ys + ys[-1:], step="post", color="#1f77b4", alpha=0.15, linewidth=0)
    ax.step(xs, ys + ys[-1:], where="post", color="#1f77b4", linewidth=1.6)
    peak = max(ys) if ys else 0.0
    ax.set_xlim(0, duration * 1.03 if duration > 0 else 1.0)
    ax.set_ylim(0, max(peak, 1.0) * 1.12)
    ax.set_xlabel("time since the first decode step (s)")
    ax.set_ylabel(f"throughput (tokens/s, {bin_s * 1000:.0f} ms bins)")
    ax.grid(alpha=0.3)
    for m in marks:
        color, style = EVENT_STYLE[m.kind]
        ax.axvline(m.t_s, color=color, linestyle=style, linewidth=1.4)
    rows = _label_events(fig, ax, marks)

    handles = [Line2D([], [], color="#1f77b4", linewidth=1.6, label="tokens/s, all ranks")]
    kinds = [k for k in EVENT_KINDS if any(m.kind == k for m in events)]
    handles += [Line2D([], [], color=EVENT_STYLE[k][0], linestyle=EVENT_STYLE[k][1], label=EVENT_KINDS[k])
                for k in kinds]
    handles.append(Line2D([], [], color=EVENT_STYLE["end"][0], linestyle="--", label="end of run"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=3, fontsize=8.5,
              frameon=False)
    # room above the axes for the rows of event names and the title, in points
    height_pt = fig.get_figheight() * 72
    top = 1 - (rows * LABEL_ROW_PT + 20 + 14 * (title.count("\n") + 1)) / height_pt
    fig.subplots_adjust(left=0.08, right=0.97, top=top, bottom=0.27)
    fig.suptitle(title, y=1 - 8 / height_pt, va="top", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return TimelinePlot(Path(path), duration, peak, events)


def _label_events(fig, ax, marks: list[RunEvent]) -> int:
    """Name every mark above the axes and return the number of rows of names used.

    Each name goes to the lowest row where it overlaps no other name and no leader (the line from
    the axes up to a raised name) crosses a name. Names start at their line (right of it; left of
    it in the last fifth of the plot), so the names of a burst of events read as a staircase.
    """
    renderer = fig.canvas.get_renderer()
    xmax = ax.get_xlim()[1]
    names: list[tuple[int, float, float]] = []  # (row, x0, x1) in pixels
    leaders: list[tuple[int, float]] = []  # (top row, x) in pixels
    # names right of their line go latest first, names left of it (the last fifth) earliest first:
    # either way a raised name's leader passes beside the names below it, not through them
    right = sorted((m for m in marks if m.t_s > 0.8 * xmax), key=lambda m: m.t_s)
    left = sorted((m for m in marks if m.t_s <= 0.8 * xmax), key=lambda m: -m.t_s)
    for m in right + left:
        color, _ = EVENT_STYLE[m.kind]
        right_side = m.t_s > 0.8 * xmax
        dx = -3 if right_side else 3
        text = ax.annotate(m.label, xy=(m.t_s, 1.0), xycoords=("data", "axes fraction"), xytext=(dx, 3),
                           textcoords="offset points", ha="right" if right_side else "left", va="bottom",
                           fontsize=8.5, color=color, annotation_clip=False)
        x = ax.transData.transform((m.t_s, 0))[0]

        def span(row: int) -> tuple[float, float]:
            text.set_position((dx, 3 + row * LABEL_ROW_PT))
            box = text.get_window_extent(renderer)
            return box.x0 - 3, box.x1 + 3

        def is_free(row: int, x0: float, x1: float, *, strict: bool) -> bool:
            if any(r == row and x1 > a and x0 < b for r, a, b in names):
                return False
            return not strict or (not any(top > row and x0 < lx < x1 for top, lx in leaders)
                                  and not any(r < row and a < x < b for r, a, b in names))

        # a name left of its line (near the right edge) may leave no row where no leader crosses
        # it: then only names must not overlap
        rows = range(len(marks) + 1)
        row = next((r for r in rows if is_free(r, *span(r), strict=True)), None)
        if row is None:
            row = next(r for r in rows if is_free(r, *span(r), strict=False))
        x0, x1 = span(row)
        names.append((row, x0, x1))
        if row:
            leaders.append((row, x))
            ax.annotate("", xy=(m.t_s, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 3 + row * LABEL_ROW_PT + 8),
                        textcoords="offset points", annotation_clip=False,
                        arrowprops={"arrowstyle": "-", "color": color, "linewidth": 0.8, "shrinkA": 0, "shrinkB": 0})
    return 1 + max(r for r, _, _ in names)


def main(argv: list[str] | None = None) -> int:
    """``python -m eep.cli.plot RUN_DIR [--png PATH] [--title TEXT]``: draw a kept run's timeline."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m eep.cli.plot", description=main.__doc__)
    parser.add_argument("run_dir", help="a run directory kept by 'eep launch --run-dir' or 'eep demo --keep'")
    parser.add_argument("--png", default=None, help="output file (default: RUN_DIR/../timeline.png)")
    parser.add_argument("--title", default="eep run timeline", help="the plot's title")
    args = parser.parse_args(argv)
    png = Path(args.png) if args.png else Path(args.run_dir).resolve().parent / "timeline.png"
    plot = plot_timeline(png, args.run_dir, title=args.title)
    print(f"{png}: {plot.duration_s:.1f} s, " + ", ".join(f"{e.label} at {e.t_s:.2f} s" for e in plot.events))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
