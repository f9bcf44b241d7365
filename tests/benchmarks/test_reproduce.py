"""benchmarks/reproduce.py: the aggregation and targets as pure functions (no Ray), and one
``--smoke`` run of the tail claim through the real job (Ray)."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT / "benchmarks"))  # reproduce imports its sibling _common

import reproduce  # noqa: E402


def records(claim: str, per_seed: list[dict], ratios: list[dict] | None = None) -> list[dict]:
    """Run records of ``claim`` as reproduce.record writes them, one per seed."""
    return [{"claim": claim, "seed": seed, "mode": "full", "run": claim, "acc": acc, "ratios": (ratios or [{}] * len(per_seed))[seed],
             "date": f"2026-12-0{seed + 1} 10:00 UTC", "invocation": "python benchmarks/reproduce.py",
             "machine": {"cpu": "test cpu", "cores": 2, "gpu": None}}
            for seed, acc in enumerate(per_seed)]


HEAD = records(
    "head",
    [{"twa_t": 90.0, "twa_v": 89.0, "full_budget": 91.1, "swa": 90.5},
     {"twa_t": 91.0, "twa_v": 89.5, "full_budget": 91.2, "swa": 90.8},
     {"twa_t": 92.0, "twa_v": 88.5, "full_budget": 91.3, "swa": 90.5}],
    [{"cost_ratio_twa_t": 0.55, "cost_ratio_twa_v": 0.52}, {"cost_ratio_twa_t": 0.56, "cost_ratio_twa_v": 0.53},
     {"cost_ratio_twa_t": 0.57, "cost_ratio_twa_v": 0.51}],
)


def reference_mean_std(xs):
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def test_mean_std_is_the_sample_std():
    xs = [90.0, 91.25, 92.5, 89.75]
    mean, std = reproduce.mean_std(xs)
    ref_mean, ref_std = reference_mean_std(xs)
    assert mean == pytest.approx(ref_mean, abs=1e-12) and std == pytest.approx(ref_std, abs=1e-12)
    assert reproduce.mean_std([88.5]) == (88.5, None)
    with pytest.raises(ValueError):
        reproduce.mean_std([])


def test_aggregate_groups_each_claim_and_metric_over_the_seeds():
    rows = {(r["claim"], r["metric"]): r for r in reproduce.aggregate(HEAD)}
    for metric in ("twa_t", "twa_v", "full_budget", "swa", "cost_ratio_twa_t", "cost_ratio_twa_v"):
        values = [rec["acc" if not metric.startswith("cost") else "ratios"][metric] for rec in HEAD]
        mean, std = reference_mean_std(values)
        row = rows[("head", metric)]
        assert row["mean"] == pytest.approx(mean, abs=1e-12) and row["std"] == pytest.approx(std, abs=1e-12)
        assert row["n"] == 3 and row["seeds"] == [0, 1, 2]
    assert rows[("head", "twa_t")]["date"] == "2026-12-01 .. 2026-12-03"
    assert rows[("head", "twa_t")]["machine"] == "test cpu, 2 cores"
    assert reproduce.format_mean_std(rows[("head", "twa_t")]) == "91.00 ± 1.00 %"
    assert reproduce.format_mean_std(rows[("head", "cost_ratio_twa_t")]) == "0.560 ± 0.010"
    with pytest.raises(ValueError, match="seed 0"):
        reproduce.aggregate(HEAD + HEAD[:1])  # one seed twice


def test_targets_compare_the_means():
    targets = {t["target"]: t for t in reproduce.evaluate_targets(reproduce.aggregate(HEAD))}
    # TWA-t 91.00 vs full budget 91.20 at cost 0.56: met; TWA-v 89.00 is 2.2 points short: not met
    assert targets["TWA-t within 0.3 points of the full budget (>= full budget - 0.3) at cost_ratio <= 0.6"]["met"] is True
    assert targets["TWA-v within 0.3 points of the full budget (>= full budget - 0.3) at cost_ratio <= 0.6"]["met"] is False
    assert targets["TWA-t >= SWA + 0.3 points"]["met"] is True  # 91.00 >= 90.60 + 0.3
    assert targets["TWA-v >= SWA + 0.3 points"]["met"] is False
    assert "TWA-t 91.00% vs full budget 91.20% (-0.20 points), cost_ratio 0.560" in [
        t["measured"] for t in targets.values()]
    assert {t["claim"] for t in targets.values()} == {"head"}  # claims that did not run have no target
    soups = records("soups", [{"twa_v": 80.0, "greedy_soup": 79.0, "uniform_soup": 70.0, "best_individual": 79.5}])
    (soup_target,) = reproduce.evaluate_targets(reproduce.aggregate(soups))
    assert soup_target["met"] is False  # greedy soup 79.0 < best single model 79.5
    assert reproduce.target_line(soup_target).endswith("| not met")


def test_missing_summary_keys_are_named():
    with pytest.raises(reproduce.SummaryError, match=r"no test_acc\.ema"):
        reproduce.need({"test_acc": {"twa": 90.0}}, "test_acc.ema", "run/summary.json")
    with pytest.raises(reproduce.SummaryError, match=r"test_acc\.ema is null"):
        reproduce.need({"test_acc": {"ema": None}}, "test_acc.ema", "run/summary.json")
    with pytest.raises(reproduce.SummaryError, match=r"twa_data is 'train', expected 'val'"):
        reproduce.check_twa_data({"twa_data": "train"}, "val", "s")


def test_twa_v_cost_replaces_the_twa_stage():
    # (10 + 2) / 20 = 0.6 -> (10 + 1) / 20
    assert reproduce.swap_twa_stage(0.6, 10.0, 2.0, 1.0) == pytest.approx(0.55, abs=1e-12)


def test_bits_runs_cover_every_width_and_basis_once():
    runs = reproduce.plan("bits", "full")
    labels = [label for run in runs for label in run.labels]
    assert sorted(labels) == sorted([f"bits={b}" for b in reproduce.BITS] + [f"basis={b}" for b in reproduce.BASES])
    assert all(run.shared_store and "compare_full_budget=false" in run.overrides for run in runs)
    # each at the lr its sweep chose on val
    assert [o for r in runs for o in r.overrides if o.startswith("twa.lr=")] == (
        [f"twa.lr={reproduce.BITS_LR[b]}" for b in reproduce.BITS]
        + [f"twa.lr={reproduce.BASIS_LR[b]}" for b in reproduce.BASES if b != "normalized"])
    head = reproduce.plan("head", "full")
    assert [r.shared_store for r in head] == [True, True, True]  # base training once per seed and candidate kind
    assert [r.store for r in head] == ["head", "head", "head_ema"]  # TWA over the EMA's candidates: its own store
    assert f"twa.lr={reproduce.EMA_CANDIDATES_LR['head']}" in head[2].overrides


def test_results_file_gives_table_plot_and_targets(tmp_path, capsys):
    jsonl = tmp_path / "reproduce.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in HEAD))
    assert reproduce.main(["--results", str(jsonl), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "reproduce.md").read_text()
    assert "| head | twa_t | 91.00 ± 1.00 % | 3 | `python benchmarks/reproduce.py` | 2026-12-01 .. 2026-12-03 |" in md
    assert (tmp_path / "reproduce.png").stat().st_size > 0
    err = capsys.readouterr().err.splitlines()
    assert sum(line.startswith("target head:") and line.endswith("met") for line in err) == 4
    # HEAD has no SGD at equal compute: its targets are named as not evaluated, not hidden
    assert sum("SGD at equal compute + 0.3 points: not evaluated" in line for line in err) == 2


@pytest.mark.ray
def test_smoke_run_of_the_tail_claim(tmp_path):
    from conftest import ray_subprocess_env

    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), "--smoke", "--claims", "tail",
         "--out", str(tmp_path), "--work", str(tmp_path / "runs")],
        cwd=ROOT, env=ray_subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = (tmp_path / "reproduce.jsonl").read_text().splitlines()
    (rec,) = [json.loads(line) for line in lines]
    assert rec["claim"] == "tail" and rec["seed"] == 0 and rec["mode"] == "smoke"
    assert set(rec["acc"]) == {"last", "swa", "ema", "twa"}
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == rec  # the same line on stdout
    targets = [line for line in proc.stderr.splitlines() if line.startswith("target ")]
    assert len(targets) == 1 and targets[0].startswith("target tail: TWA >= SWA |")
    assert targets[0].endswith(("| met", "| not met")) and re.search(r"\d+\.\d\d%", targets[0])
    met = rec["acc"]["twa"] >= rec["acc"]["swa"]
    assert targets[0].endswith("| met" if met else "| not met")
    md = (tmp_path / "reproduce.md").read_text()
    assert f"| tail | twa | {rec['acc']['twa']:.2f} ± n/a % | 1 |" in md  # one seed: no std
    assert (tmp_path / "reproduce.png").stat().st_size > 0


def test_readme_block_is_replaced_and_a_file_without_it_is_left_alone(tmp_path):
    both = HEAD + [{**rec, "claim": "bits", "acc": {"bits=4": 91.0 + rec["seed"], "bits=32": 91.1}, "ratios": {},
                    "invocation": "python benchmarks/reproduce.py --claims bits",
                    "machine": {**rec["machine"], "git_commit": "abc1234"}} for rec in HEAD]
    rows = reproduce.aggregate(both)
    targets = reproduce.evaluate_targets(rows)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{reproduce.README_BEGIN}\nold numbers\n{reproduce.README_END}\nafter\n")
    reproduce.write_readme(readme, rows, targets, both)
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("\nafter\n")
    block = text[text.index(reproduce.README_BEGIN):text.index(reproduce.README_END)]
    lines = block.splitlines()
    # one heading per claim, each with its commands (dates, commit) right under it
    heads = [i for i, line in enumerate(lines) if line.startswith("### ")]
    assert [lines[i] for i in heads] == [f"### {reproduce.CLAIM_TITLES['head']}", f"### {reproduce.CLAIM_TITLES['bits']}"]
    assert lines[heads[0] + 2:heads[0] + 5] == [
        "```bash", "python benchmarks/reproduce.py   # 2026-12-01, 2026-12-02, 2026-12-03, commit not recorded", "```"]
    assert lines[heads[1] + 3].endswith("commit abc1234")
    # the machine is named once, for the whole block
    assert block.count("test cpu, 2 cores") == 1
    # head compares seed by seed: the paired table, with TWA-t - full budget per seed
    head = "\n".join(lines[heads[0]:heads[1]])
    mean = sum(r["acc"]["twa_t"] for r in HEAD) / 3
    diff = sum(r["acc"]["twa_t"] - r["acc"]["full_budget"] for r in HEAD) / 3
    assert f"| twa_t | {mean:.2f} ± " in head and f"| full_budget | 91.20 ± 0.10 | 3 | {diff:+.2f} ± " in head
    assert "| cost_ratio_twa_t | 0.560 ± 0.010 | 3 |" in head
    assert sum(line.startswith("| TWA-") for line in head.splitlines()) == sum(t["claim"] == "head" for t in targets)
    bits = "\n".join(lines[heads[1]:])
    assert "| bits=4 | 92.00 ± 1.00 % | 3 |" in bits and "| 4-bit within 0.2 points of 32-bit" in bits
    again = readme.read_text()
    reproduce.write_readme(readme, rows, targets, both)  # idempotent
    assert readme.read_text() == again
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no block\n")
    with pytest.raises(SystemExit, match="PLAIN.md has no"):
        reproduce.write_readme(plain, rows, targets, both)
    assert plain.read_text() == "no block\n"


def test_runs_picks_runs_by_name_and_an_unknown_name_is_named(tmp_path, monkeypatch, capsys):
    class Ran(Exception):
        pass

    def execute(cmd, threads):
        raise Ran(cmd)

    monkeypatch.setattr(reproduce, "execute", execute)
    args = ["--claims", "bits", "--seeds", "1", "--work", str(tmp_path / "runs"), "--out", str(tmp_path)]
    with pytest.raises(Ran) as ran:
        reproduce.main(args + ["--runs", "bits_32"])
    assert "twa.bits=32" in ran.value.args[0] and "twa.bits=1" not in ran.value.args[0]  # bits_1 comes first otherwise
    with pytest.raises(SystemExit):
        reproduce.main(args + ["--runs", "bits_3"])
    assert "--runs: bits_3 is no run of bits" in capsys.readouterr().err


def test_seed_list_runs_only_the_seeds_named(tmp_path, monkeypatch, capsys):
    ran = []

    class Ran(Exception):
        pass

    def execute(cmd, threads):
        ran.append(cmd)
        raise Ran(cmd)

    monkeypatch.setattr(reproduce, "execute", execute)
    args = ["--claims", "tail", "--work", str(tmp_path / "runs"), "--out", str(tmp_path)]
    with pytest.raises(Ran):
        reproduce.main(args + ["--seed-list", "2"])
    assert "seed=2" in ran[0] and not any("seed=0" in a for a in ran[0])
    for bad, message in (("x", "comma-separated integers"), ("-1", "seeds >= 0"), (",", "one or more seeds")):
        with pytest.raises(SystemExit):
            reproduce.main(args + ["--seed-list", bad])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reproduce.main(args + ["--seed-list", "1", "--seeds", "2"])
    assert "not both" in capsys.readouterr().err


def test_results_of_several_files_merge_one_line_per_run_the_last_file_winning(tmp_path):
    first, again = HEAD[0], dict(HEAD[0], acc={**HEAD[0]["acc"], "twa_t": 99.0})
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in HEAD))
    b.write_text(json.dumps(again) + "\n")
    merged = reproduce.merged_records([a, b])
    assert len(merged) == len(HEAD) and merged[0]["acc"]["twa_t"] == 99.0 and merged[1:] == HEAD[1:]
    assert first["acc"]["twa_t"] != 99.0
    assert reproduce.main(["--results", str(a), str(b), "--merged", str(tmp_path / "all.jsonl"),
                           "--out", str(tmp_path)]) == 0
    assert [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()] == merged


def test_a_targets_seed_count_is_that_of_the_metrics_it_compares():
    bits = records("bits", [{"bits=1": 10.0, "bits=4": 91.0, "bits=32": 91.1}, {"bits=4": 91.2, "bits=32": 91.1}])
    (target,) = reproduce.evaluate_targets(reproduce.aggregate(bits))
    assert target["n"] == 2 and target["met"]  # bits=1 ran on one seed only: not compared


def _head_summary(twa_epochs: int = 1) -> dict:
    """A head-stage TWA-t summary.json with the keys reproduce reads."""
    return {"twa_data": "train", "twa_epochs": twa_epochs, "cost_ratio": 0.55, "wall_ratio": 0.57,
            "twa_epoch_vs_sgd_epoch": 0.96,
            "test_acc": {"last": 89.0, "swa": 90.0, "ema": 91.0, "best_k": 90.5, "full_budget": 92.5, "twa": 91.5,
                         "sgd_same_compute": 91.0},
            "time_s": {"base_train": {"startup": 10.0, "compute": 230.0}}}


def test_the_probe_claim_trains_longer_on_heads_store_and_reruns_the_head_stage_with_a_cosine_budget(tmp_path):
    epochs_run, cosine_run = reproduce.plan("probe", "full")
    assert epochs_run.shared_store and f"twa.epochs={reproduce.PROBE_EPOCHS}" in epochs_run.overrides
    assert not cosine_run.shared_store  # its own candidates: from a decaying lr
    assert {"train.schedule=cosine", "compare_full_budget=true"} <= set(cosine_run.overrides)
    cmd, run_dir = reproduce.job_command(epochs_run, 1, tmp_path)
    assert f"store={tmp_path / 'seed1' / 'head_candidates'}" in cmd  # the head claim's store of that seed

    acc, ratios = reproduce.measure(epochs_run, _head_summary(reproduce.PROBE_EPOCHS), "s.json", None)
    assert acc == {f"twa_t_{reproduce.PROBE_EPOCHS}_epochs": 91.5} and ratios == {}
    with pytest.raises(reproduce.SummaryError, match="s.json: twa_epochs is 1"):
        reproduce.measure(epochs_run, _head_summary(1), "s.json", None)
    acc, ratios = reproduce.measure(cosine_run, _head_summary(), "c.json", None)
    assert acc["cosine_twa_t"] == 91.5 and acc["cosine_full_budget"] == 92.5 and "twa_t" not in acc
    assert ratios == {"cost_ratio_cosine_twa_t": 0.55}


def test_a_target_whose_metric_no_run_gave_is_left_out_with_a_note(capsys):
    """--runs bits_1,bits_2 gives no bits=4 / bits=32: the 4-bit target is not evaluated (not an error)."""
    bits = records("bits", [{"bits=1": 90.5, "bits=2": 91.4}, {"bits=1": 91.0, "bits=2": 91.5}])
    assert reproduce.evaluate_targets(reproduce.aggregate(bits)) == []
    assert "not evaluated, no run of bits gave bits=4" in capsys.readouterr().err


def test_commands_are_recorded_as_a_user_types_them(tmp_path):
    """No machine's folders in a recorded command: the interpreter is `python`, paths inside the
    repository are relative to it, --work/--out appear only when given (then as given)."""
    work = reproduce.ROOT / "runs" / "reproduce" / "quick"
    cmd, _ = reproduce.job_command(reproduce.plan("head", "quick")[0], 2, work)
    typed = reproduce.as_typed(cmd)
    assert typed.startswith("python -m twa_ray ") and str(reproduce.ROOT) not in typed
    assert "output_dir=runs/reproduce/quick/seed2/" in typed
    assert reproduce.as_typed(["python", "benchmarks/reproduce.py", "--claims", "head"]) == \
        "python benchmarks/reproduce.py --claims head"
    outside = tmp_path / "elsewhere"  # a folder the user named outside the checkout stays as named
    assert reproduce.as_typed(["python", f"--work={outside}"]) == f"python --work={outside}"


def test_the_answer_table_pairs_twa_t_with_each_method_per_setting_and_fills_its_readme_block(tmp_path):
    def setting(claim, accs):
        return [{**rec, "compute": {}, "epochs_fraction": {"twa_t": 0.55, "sgd_same_compute": 0.55, "ema": 0.5}}
                for rec in records(claim, accs)]
    fitted = setting("fitted", [{"twa_t": 87.5, "ema": 87.4, "sgd_same_compute": 87.0},
                                {"twa_t": 87.7, "ema": 87.6, "sgd_same_compute": 87.4}])
    head = setting("head", [{"twa_t": 91.4, "ema": 91.5, "sgd_same_compute": 91.9},
                            {"twa_t": 91.2, "ema": 91.4, "sgd_same_compute": 91.6},
                            {"twa_t": 91.3, "ema": 91.3, "sgd_same_compute": 91.9}])
    table = reproduce.answer_table(fitted + head)
    assert table[0] == "| method | **fitted** (2 seeds): acc | TWA-t − X | **head** (3 seeds): acc | TWA-t − X | cost |"
    rows = {line.split(" | ")[0][2:]: line for line in table[2:]}
    assert list(rows) == ["TWA-t (TWA on train)", "EMA of the weights", "SGD at equal compute"]  # nothing run: no row
    # paired by seed: fitted (+0.5, +0.3), head (-0.5, -0.4, -0.6)
    assert rows["SGD at equal compute"] == (
        "| SGD at equal compute | 87.20 ± 0.28 | **+0.40 ± 0.14** | 91.80 ± 0.17 | **−0.50 ± 0.10** | 0.55 |")
    assert rows["EMA of the weights"].endswith("| 0.50 |")
    readme = tmp_path / "README.md"
    readme.write_text(f"{reproduce.ANSWER_BEGIN}\nold\n{reproduce.ANSWER_END}\n\n{reproduce.README_BEGIN}\n"
                      f"{reproduce.README_END}\n")
    rows_all = reproduce.aggregate(fitted + head)
    reproduce.write_readme(readme, rows_all, reproduce.evaluate_targets(rows_all), fitted + head)
    text = readme.read_text()
    assert "old" not in text and "\n".join(table) in text
