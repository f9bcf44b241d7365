"""What every job command shares: its flags, loading the config, and turning an expected
failure into one ``error:`` line and an exit status."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Mapping

from ..config import Config, ConfigError, load_config, settle_locations
from ..output.console import results_table
from ..output.report import write_report
from ..output.tensorboard import write_run_events

log = logging.getLogger(__name__)

# Failures a user can fix (missing data, a bad store or checkpoint folder, a diverged run):
# one line, no traceback (--verbose logs the traceback at debug level).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError)

Command = Callable[[argparse.Namespace], int]


def add_job_arguments(parser: argparse.ArgumentParser, example: str, *, force: bool = True,
                      overrides_help: str = "config overrides a.b=value") -> None:
    """--config, [--force], --verbose and the a.b=value overrides of a job command."""
    parser.add_argument("--config", required=True, help=f"YAML config, e.g. {example}")
    if force:
        parser.add_argument("--force", action="store_true",
                            help="start afresh: discard this run folder's earlier results (only a run folder of "
                                 "twa_ray, with its .twa_ray_run marker, or an empty folder)")
    parser.add_argument("--verbose", action="store_true",
                        help="debug lines, and Ray's own console lines (Tune's trial tables too)")
    parser.add_argument("overrides", nargs="*", help=overrides_help)


def load_job_config(args: argparse.Namespace, check: Callable[[Config], None] | None = None) -> Config | None:
    """The config ``args`` name, overrides applied, every location settled absolute
    (``config.settle_locations``: the run folder, the store and Ray's storage under the
    storage root, data.root under the working directory), its task loadable
    (``tasks.check_task``) and ``check`` passed; None after
    printing the errors (each naming the field) to stderr."""
    from ..tasks import check_task  # loads torch: not for show and export

    try:
        cfg = settle_locations(load_config(args.config, args.overrides))
        check_task(cfg)  # imports the user's task: a bad path or object is named here, before anything starts
        if check is not None:
            check(cfg)
        return cfg
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def job_run_dir(cfg: Config, force: bool = False):
    """The job's run folder (``pipelines.runs.prepare_run_dir``: made, marked, with ``force``
    cleared); None after printing its ConfigError (naming output_dir or name: a folder that
    --force must not remove, or the working directory) to stderr."""
    from ..pipelines.runs import prepare_run_dir

    try:
        return prepare_run_dir(cfg, force=force)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def report_errors(run: Callable[[], int]) -> int:
    """``run()``'s exit status; a USER_ERRORS exception becomes ``error: ...`` on stderr and 1."""
    try:
        return run()
    except USER_ERRORS as exc:
        log.debug("details", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1


def finish(run_dir: Path, summary: Mapping, tensorboard: bool = False) -> None:
    """A job's last lines, once its run folder is written: TensorBoard event files (with
    ``report.tensorboard``), report.html, the results table, and where the model, the
    report and the run folder are."""
    if tensorboard:
        log.info("TensorBoard: tensorboard --logdir %s", write_run_events(run_dir))
    report = write_report(run_dir)
    print(results_table(summary))
    print(f"model:  {run_dir / 'model.pt'}\nreport: {report}")
    print(f"run folder: {run_dir}")


def standalone(doc: str, add_arguments: Callable[[argparse.ArgumentParser], None], command: Command,
               argv: list[str] | None = None) -> int:
    """Run one command with its own parser (the ``jobs/*.py`` scripts): the same flags as
    its ``twa-ray`` subcommand."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return command(parser.parse_args(argv))
