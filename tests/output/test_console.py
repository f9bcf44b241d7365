"""The console: one log format, progress lines with an ETA, the results table of a summary."""
import io
import logging
import re

import pytest

from twa_ray.output.console import Progress, format_duration, method_rows, results_table, setup_logging

MAIN_SUMMARY = {
    "config": "quickstart", "dataset": "fashion_mnist", "model": "small_cnn", "twa_data": "val",
    "base_epochs": 4, "budget_epochs": 8, "twa_epochs": 2,
    "test_acc": {"last": 85.25, "swa": 86.5, "twa": 87.75, "full_budget": 88.0},
    "test_loss": {"last": 0.41, "swa": 0.39, "twa": 0.35, "full_budget": 0.33},
    "time_s": {"base_train": 60.0, "twa": 15.5, "twa_in_workers": 9.0, "full_budget": 118.0},
    "projection_bytes_per_worker": [1000, 1000],
}

SOUP_SUMMARY = {
    "num_models": 5, "twa_data": "val", "twa_epochs": 3,
    "test_acc": {"best_individual": 70.0, "uniform_soup": 71.0, "greedy_soup": 72.0, "twa": 73.0},
    "test_loss": {"best_individual": 1.0, "uniform_soup": 0.9, "greedy_soup": 0.8, "twa": 0.7},
    "time_s": {"pretrain": 10.0, "finetune": 20.0, "soups": 2.0, "twa": 5.0, "evaluate": 4.0},
}


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def records():
    """The lines logged under twa_ray while the test runs (formatted by setup_logging's handler)."""
    stream = io.StringIO()
    logger = setup_logging(stream=stream)
    yield stream
    for handler in [h for h in logger.handlers if getattr(h, "_twa_ray", False)]:
        logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


def test_setup_logging_one_format_and_one_handler(records):
    setup_logging(stream=records)  # again: replaces, never duplicates
    logging.getLogger("twa_ray.runtime.twa_loop").info("epoch %d", 3)
    logging.getLogger("twa_ray.x").debug("hidden at the default verbosity")
    lines = records.getvalue().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(r"\d\d:\d\d:\d\d twa_ray\.runtime\.twa_loop: epoch 3", lines[0])
    assert not logging.getLogger("twa_ray").propagate


def test_setup_logging_worker_ranks_and_verbose(records):
    setup_logging(rank=1, stream=records)
    log = logging.getLogger("twa_ray.w")
    log.info("rank 1 progress is not repeated")
    log.warning("but its warnings show")
    setup_logging(verbose=True, stream=records)
    log.debug("verbose shows debug")
    lines = records.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("twa_ray.w [rank 1]: but its warnings show")
    assert lines[1].endswith("twa_ray.w: verbose shows debug")


def test_without_a_stream_lines_go_to_stderr_as_it_is_when_written(records, monkeypatch):
    setup_logging()
    first, later = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    logging.getLogger("twa_ray.x").info("one")
    first.close()  # a stream closed since (a finished test's capture, a redirected stderr restored)
    monkeypatch.setattr("sys.stderr", later)
    logging.getLogger("twa_ray.x").info("two")
    assert later.getvalue().endswith("twa_ray.x: two\n") and "Logging error" not in later.getvalue()


def test_format_duration():
    assert format_duration(0) == "0:00"
    assert format_duration(75.4) == "1:15"
    assert format_duration(3725) == "1:02:05"


def test_progress_epoch_lines_with_elapsed_and_eta(records):
    clock = FakeClock()
    progress = Progress("TWA", total=4, clock=clock)
    clock.now += 30
    progress.done(0, val_acc=91.234, loss=0.5)
    clock.now += 30
    progress.done(1)
    lines = records.getvalue().splitlines()
    # 1 of 4 epochs in 30 s: 3 left at 30 s each
    assert lines[0].endswith("TWA epoch 1/4: val_acc 91.23, loss 0.5 | 0:30 elapsed, ETA 1:30")
    assert lines[1].endswith("TWA epoch 2/4: | 1:00 elapsed, ETA 1:00")


def test_progress_eta_counts_only_the_work_of_this_process(records):
    clock = FakeClock()
    progress = Progress("base training", total=10, start=8, clock=clock)  # resumed at epoch 8
    clock.now += 50
    progress.done(8)
    assert records.getvalue().strip().endswith("epoch 9/10: | 0:50 elapsed, ETA 0:50")


def test_progress_step_lines_on_long_epochs(records):
    clock = FakeClock()
    progress = Progress("base training", total=2, steps_per_unit=100, every_steps=40, interval_s=None, clock=clock)
    logged = []
    for step in range(1, 101):
        clock.now += 1
        logged.append(progress.step(0, step, loss=1.0))
    progress.done(0)
    assert [i + 1 for i, did in enumerate(logged) if did] == [40, 80]  # step 100 is the epoch's own line
    lines = records.getvalue().splitlines()
    assert len(lines) == 3
    # 0.4 epochs in 40 s, 1.6 epochs left
    assert lines[0].endswith("base training epoch 1/2, step 40/100: loss 1 | 0:40 elapsed, ETA 2:40")
    assert lines[2].endswith("base training epoch 1/2: | 1:40 elapsed, ETA 1:40")


def test_progress_time_based_step_lines(records):
    clock = FakeClock()
    progress = Progress("TWA", total=1, steps_per_unit=1000, interval_s=30, clock=clock)
    due = []
    for step in range(1, 100):
        clock.now += 1
        due.append(progress.step(0, step))
    assert [i + 1 for i, did in enumerate(due) if did] == [30, 60, 90]


def test_progress_per_model_units(records):
    clock = FakeClock()
    progress = Progress("evaluation", total=3, unit="model", clock=clock)
    for i, name in enumerate(("last", "swa", "twa")):
        clock.now += 2
        progress.done(i, model=name, acc=80.0 + i)
    lines = records.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "evaluation model 1/3: model last, acc 80 | 0:02 elapsed, ETA 0:04",
        "evaluation model 2/3: model swa, acc 81 | 0:04 elapsed, ETA 0:02",
        "evaluation model 3/3: model twa, acc 82 | 0:06 elapsed, ETA 0:00",
    ]


def test_method_rows_of_the_main_job():
    rows = {r["key"]: r for r in method_rows(MAIN_SUMMARY)}
    assert list(rows) == ["last", "swa", "twa", "full_budget"]
    assert rows["twa"]["method"] == "TWA"
    assert rows["twa"]["epochs"] == 6 and rows["twa"]["compute_s"] == pytest.approx(75.5)
    assert rows["twa"]["trained_on"] == "fashion_mnist train; TWA on val"
    assert rows["swa"]["epochs"] == 4 and rows["swa"]["compute_s"] == 60.0
    assert rows["full_budget"]["epochs"] == 8 and rows["full_budget"]["compute_s"] == 118.0
    assert rows["full_budget"]["test_loss"] == 0.33
    # two rounds of TWA: summary["epochs"]["twa"] counts both
    rounds = {**MAIN_SUMMARY, "epochs": {"base": 4, "twa": 4, "full_budget": 8}}
    assert {r["key"]: r for r in method_rows(rounds)}["twa"]["epochs"] == 8


def test_method_rows_of_the_soup_job():
    rows = {r["key"]: r for r in method_rows(SOUP_SUMMARY)}
    assert rows["greedy_soup"]["method"] == "greedy soup"
    assert rows["greedy_soup"]["compute_s"] == 32.0 and rows["greedy_soup"]["epochs"] is None
    assert rows["twa"]["compute_s"] == 35.0 and rows["twa"]["epochs"] == 3
    assert rows["twa"]["trained_on"] == "5 fine-tuned models; TWA on val"


def test_results_table_lists_every_method_with_its_numbers():
    table = results_table(MAIN_SUMMARY)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["method", "test", "acc"]
    assert set(lines[1]) <= {"-", " "}
    body = {line.split("  ")[0].strip(): line for line in lines[2:]}
    assert set(body) == {"last", "SWA", "TWA", "full budget"}
    assert "87.75" in body["TWA"] and "0.3500" in body["TWA"] and "75.5" in body["TWA"]
    assert "88.00" in body["full budget"] and "118.0" in body["full budget"]
    acc_end = lines[0].index("test acc (%)") + len("test acc (%)")
    for line, acc in zip(lines[2:], ("85.25", "86.50", "87.75", "88.00")):
        assert line.index(acc) + len(acc) == acc_end  # numbers right-aligned under their header


def test_results_table_tolerates_missing_keys():
    summary = {"test_acc": {"last": 50.0, "swa": None, "mystery": 12.5}}
    lines = results_table(summary).splitlines()
    assert len(lines) == 4  # header, rule, last, mystery (swa has no result)
    assert lines[2].split()[:2] == ["last", "50.00"]
    assert lines[3].split()[:2] == ["mystery", "12.50"]
    assert lines[3].split()[2:] == ["-", "-", "-", "train"]
    assert results_table({}) == "no test results in this summary"
