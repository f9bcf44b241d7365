"""report.html: one self-contained page per run folder, opened with a double-click, offline.

The page holds the results table (``console.method_rows``), every PNG of ``plots/``
embedded as base64, the timings, the projection bytes per worker, the config, any other
JSON record of the folder (a sweep's best.json), and relative links to the model files.
No external URL: inline CSS, no scripts, no fonts.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..store import fs as store_fs
from .atomic import read_json, write_bytes
from .console import columns, method_rows, row_cells

REPORT_FILE = "report.html"
MODEL_SUFFIXES = (".pt", ".safetensors")

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { padding: 0.25em 0.8em; border-bottom: 1px solid #eee; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #666; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Iterable[int] = ()) -> str:
    numeric = set(numeric)
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
                         for i, c in enumerate(row)) + "</tr>\n"
        for row in rows
    )
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


def _bytes(n: int) -> str:
    """``512`` -> ``"512 B"``, ``3 << 20`` -> ``"3.0 MiB"``."""
    size, unit = float(n), "B"
    for larger in ("KiB", "MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, larger
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def _seconds(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _results_section(summary: Mapping[str, Any]) -> str:
    rows = [row_cells(r) for r in method_rows(summary)]
    if not rows:
        return "<p>No test results in summary.json.</p>\n"
    return _table(columns(summary), rows, numeric=(1, 2, 3, 4))


def _details_section(summary: Mapping[str, Any]) -> str:
    """The summary's plain entries (config name, dataset, model, bits, ...)."""
    rows = [(k, v) for k, v in summary.items() if isinstance(v, (str, int, float, bool)) or v is None]
    return _table(("", ""), rows) if rows else ""


def _timings_section(summary: Mapping[str, Any]) -> str:
    parts = []
    times = summary.get("time_s")
    if isinstance(times, Mapping) and times:
        if any(isinstance(v, Mapping) for v in times.values()):  # the main job: {"startup", "compute"} per stage
            rows = ((k, *((_seconds(v.get("startup")), _seconds(v.get("compute"))) if isinstance(v, Mapping)
                          else ("-", _seconds(v)))) for k, v in times.items())
            parts.append(_table(("stage", "start-up (s)", "compute (s)"), rows, numeric=(1, 2)))
        else:
            parts.append(_table(("stage", "seconds"), ((k, _seconds(v)) for k, v in times.items()), numeric=(1,)))
    projection = summary.get("projection_bytes_per_worker")
    if isinstance(projection, Sequence) and projection:
        parts.append("<h3>Projection bytes per worker</h3>\n")
        parts.append(_table(("worker", "bytes", ""), ((i, int(b), _bytes(int(b))) for i, b in enumerate(projection)),
                            numeric=(1, 2)))
    return "".join(parts)


def _plots_section(run_dir) -> str:
    figures = []
    for name, _ in store_fs.files_in(run_dir / "plots"):
        if not name.endswith(".png"):
            continue
        data = base64.b64encode(store_fs.read_file(run_dir / "plots" / name)).decode("ascii")
        figures.append(f'<figure><img alt="{_e(name[:-len(".png")])}" src="data:image/png;base64,{data}">'
                       f"<figcaption>plots/{_e(name)}</figcaption></figure>\n")
    return "".join(figures) or "<p>No plots.</p>\n"


def _model_entries(run_dir) -> list[tuple[Path, int]]:
    """(path relative to the run folder, bytes) of each model file, in ``model_files`` order."""
    top = {name: size for name, size in store_fs.files_in(run_dir)}
    found = [(Path(f"model{s}"), top[f"model{s}"]) for s in MODEL_SUFFIXES if f"model{s}" in top]
    found += [(Path("models") / name, size) for name, size in store_fs.files_in(run_dir / "models")
              if Path(name).suffix in MODEL_SUFFIXES]
    return found


def model_files(run_dir: str | Path) -> list[Path]:
    """The model files of a run folder (a local folder or a URI), relative to it:
    model.pt / model.safetensors, then models/*."""
    return [p for p, _ in _model_entries(store_fs.as_location(run_dir))]


def _models_section(run_dir) -> str:
    entries = _model_entries(run_dir)
    if not entries:
        return "<p>No model files.</p>\n"
    items = "".join(f'<li><a href="{_e(p.as_posix())}">{_e(p.as_posix())}</a> '
                    f"({_bytes(size)})</li>\n" for p, size in entries)
    return f"<ul>\n{items}</ul>\n"


def _json_block(data: Any) -> str:
    return f"<pre>{_e(json.dumps(data, indent=2, sort_keys=False))}</pre>\n"


def render_report(run_dir: str | Path) -> str:
    """The report page of ``run_dir`` (a local folder or a URI) as an HTML string
    (``write_report`` writes it)."""
    run_dir = store_fs.as_location(run_dir)
    summary = read_json(run_dir / "summary.json") if store_fs.file_exists(run_dir / "summary.json") else {}
    title = " · ".join(str(summary[k]) for k in ("config", "dataset", "model") if summary.get(k)) or run_dir.name
    sections = [
        ("Results", _results_section(summary)),
        ("Plots", _plots_section(run_dir)),
        ("Models", _models_section(run_dir)),
        ("Timings", _timings_section(summary)),
        ("Run", _details_section(summary)),
    ]
    names = [name for name, _ in store_fs.files_in(run_dir)]
    if "config.json" in names:
        sections.append(("Config (config.json)", _json_block(read_json(run_dir / "config.json"))))
    for name in names:
        if name.endswith(".json") and not name.startswith(".") and name not in ("summary.json", "config.json"):
            sections.append((name, _json_block(read_json(run_dir / name))))
    body = "".join(f"<h2>{_e(name)}</h2>\n{content}" for name, content in sections if content)
    shown = run_dir.resolve() if isinstance(run_dir, Path) else run_dir
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>TWA run: {_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>TWA run: {_e(title)}</h1>\n<p>Run folder: <code>{_e(shown)}</code></p>\n"
        f"{body}</body>\n</html>\n"
    )


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` atomically from the folder's files; returns its path.

    Call it last, once summary.json, config.json, the plots and the model files are there.
    """
    path = store_fs.as_location(run_dir) / REPORT_FILE
    write_bytes(path, render_report(run_dir).encode("utf-8"))
    return path
