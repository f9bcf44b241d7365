"""What a run prints: one log format, progress lines with an ETA, the final results table.

- ``setup_logging``: the ``twa_ray`` logger's one handler and format, in drivers and in
  Ray workers alike (``HH:MM:SS twa_ray.<module>: message``);
- ``Progress``: a line per epoch (or per model, per trial) and, on long epochs, every
  ``every_steps`` steps or ``interval_s`` seconds, with the elapsed time and an ETA;
- ``method_rows`` / ``results_table``: the results of a run folder's ``summary.json``,
  one row per method (also the report page's table and the CLI's ``show``).
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, Mapping

from .methods import method, number

PACKAGE = "twa_ray"
LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"
WORKER_LOG_FORMAT = "%(asctime)s %(name)s [rank %(rank)s]: %(message)s"
DATE_FORMAT = "%H:%M:%S"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


class _CurrentStderr(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stderr`` is when a line is written, not when it was set
    up: a program (or a test) that swaps stderr later gets the lines, and a closed old stream
    never raises a "Logging error"."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ / setStream: always the current stderr
        pass


def setup_logging(verbose: bool = False, rank: int | None = None, stream=None) -> logging.Logger:
    """Give the ``twa_ray`` logger its one handler; returns that logger.

    Safe to call again (in a Ray worker that runs several loops): the handler is replaced,
    never added twice. The logger does not propagate, so whatever Ray or a job puts on the
    root logger neither repeats nor reformats these lines. ``rank``: a Ray Train worker's
    world rank; rank 0 logs like a driver, other ranks only warnings (tagged with their
    rank), unless ``verbose``. ``verbose`` also turns on DEBUG lines. Without ``stream`` the
    lines go to ``sys.stderr`` as it is at each line.
    """
    logger = logging.getLogger(PACKAGE)
    for handler in [h for h in logger.handlers if getattr(h, "_twa_ray", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderr()
    handler._twa_ray = True  # marks the handler this function owns
    if rank:
        handler.setFormatter(logging.Formatter(WORKER_LOG_FORMAT, DATE_FORMAT))
        handler.addFilter(_RankFilter(rank))
    else:
        handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    logger.addHandler(handler)
    if verbose:
        logger.setLevel(logging.DEBUG)
    else:
        logger.setLevel(logging.WARNING if rank else logging.INFO)
    logger.propagate = False
    return logger


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"`` (whole seconds)."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """Progress lines of one stage: one per finished unit (epoch, model, trial) and, within
    a long unit, one every ``every_steps`` steps or ``interval_s`` seconds.

    The ETA assumes the remaining work goes at the pace of the work done in this process
    (``start`` units done before, e.g. on resume, count as neither). Work is counted in
    steps when ``steps_per_unit`` is known, else in units.

        progress = Progress("TWA", total=epochs, steps_per_unit=len(loader), start=first_epoch)
        for epoch in range(first_epoch, epochs):
            for step, batch in enumerate(loader, 1):
                ...
                progress.step(epoch, step, loss=loss.item())
            progress.done(epoch, val_acc=acc)

    logs ``TWA epoch 3/10: val_acc 91.2 | 0:42 elapsed, ETA 1:38`` (``epoch`` is 0-based in
    the calls, 1-based in the lines).
    """

    def __init__(
        self,
        stage: str,
        total: int,
        unit: str = "epoch",
        steps_per_unit: int | None = None,
        start: int = 0,
        every_steps: int | None = None,
        interval_s: float | None = 30.0,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stage, self.total, self.unit = stage, int(total), unit
        self.steps_per_unit = steps_per_unit if steps_per_unit and steps_per_unit > 0 else None
        self.start, self.every_steps, self.interval_s = int(start), every_steps, interval_s
        self.log = logger or logging.getLogger(f"{PACKAGE}.progress")
        self.clock = clock
        self.started = self.last_line = clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def eta(self, done_fraction_units: float) -> float | None:
        """Seconds left once ``done_fraction_units`` units (fractional) are done; None before any."""
        done = done_fraction_units - self.start
        if done <= 0:
            return None
        return self.elapsed() / done * max(0.0, self.total - done_fraction_units)

    def step(self, unit: int, step: int, **metrics: Any) -> bool:
        """After ``step`` (1-based) of ``unit`` (0-based): logs when a step line is due; returns whether it logged."""
        due_by_steps = bool(self.every_steps) and step % self.every_steps == 0
        due_by_time = self.interval_s is not None and self.clock() - self.last_line >= self.interval_s
        last_step = self.steps_per_unit is not None and step >= self.steps_per_unit
        if last_step or not (due_by_steps or due_by_time):
            return False  # the unit's own line follows
        where = f"step {step}/{self.steps_per_unit}" if self.steps_per_unit else f"step {step}"
        fraction = unit + step / self.steps_per_unit if self.steps_per_unit else float(unit)
        self._line(f"{self.unit} {unit + 1}/{self.total}, {where}", fraction, metrics)
        return True

    def done(self, unit: int, **metrics: Any) -> None:
        """After ``unit`` (0-based) finished: its line."""
        self._line(f"{self.unit} {unit + 1}/{self.total}", unit + 1.0, metrics)

    def _line(self, where: str, done_units: float, metrics: Mapping[str, Any]) -> None:
        self.last_line = self.clock()
        values = ", ".join(f"{k} {_format_value(v)}" for k, v in metrics.items())
        eta = self.eta(done_units)
        timing = f"{format_duration(self.elapsed())} elapsed" + (f", ETA {format_duration(eta)}" if eta is not None else "")
        self.log.info("%s %s: %s| %s", self.stage, where, f"{values} " if values else "", timing)


# ---------------------------------------------------------------- the results table

COLUMNS = ("method", "test acc (%)", "test loss", "epochs", "compute (s)", "trained on")


def summary_metric(summary: Mapping[str, Any]) -> str:
    """The task's metric a summary reports (``summary["metric"]``; "acc" in summaries from
    before tasks), its test values under ``test_<metric>``."""
    return str(summary.get("metric") or "acc")


def columns(summary: Mapping[str, Any]) -> tuple[str, ...]:
    """The results table's header: COLUMNS, with the task's metric named (image classification: test acc (%))."""
    metric = summary_metric(summary)
    return COLUMNS if metric == "acc" else (COLUMNS[0], f"test {metric}") + COLUMNS[2:]


def method_rows(summary: Mapping[str, Any]) -> list[dict]:
    """One row per method with a test value in ``summary["test_<metric>"]`` (``test_acc`` for
    image classification), in its order: {'method', 'key', 'test', 'test_loss', 'epochs',
    'compute_s', 'trained_on'}, the label and the cost as the method's registry entry
    (``output.methods``) reads them from the summary; what the summary does not say is None.
    Works for the main job's and the soup job's summaries."""
    values = summary.get(f"test_{summary_metric(summary)}") or {}
    losses = summary.get("test_loss") or {}
    rows = []
    for key, value in values.items():
        if number(value) is None:
            continue
        entry = method(key)
        epochs, compute, trained_on = entry.cost(summary)
        rows.append({
            "method": entry.label, "key": key,
            "test": float(value), "test_loss": number(losses.get(key)),
            "epochs": epochs, "compute_s": compute, "trained_on": trained_on,
        })
    return rows


def row_cells(row: Mapping[str, Any]) -> list[str]:
    """A ``method_rows`` row as the table's text cells (``-`` for what is unknown)."""
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)
    epochs = row["epochs"]
    return [
        row["method"], fmt(row["test"], ".2f" if abs(row["test"]) < 1e4 else ".4g"), fmt(row["test_loss"], ".4f"),
        "-" if epochs is None else (f"{epochs:.0f}" if float(epochs).is_integer() else f"{epochs:g}"),
        fmt(row["compute_s"], ".1f"), row["trained_on"] or "-",
    ]


def results_table(summary: Mapping[str, Any]) -> str:
    """The final results table of a run (``summary.json``'s content) as aligned text lines."""
    rows = [list(columns(summary))] + [row_cells(r) for r in method_rows(summary)]
    if len(rows) == 1:
        return "no test results in this summary"
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    numeric = {1, 2, 3, 4}
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = ["setup_logging", "Progress", "format_duration", "method_rows", "results_table", "row_cells", "COLUMNS",
           "columns", "summary_metric"]
