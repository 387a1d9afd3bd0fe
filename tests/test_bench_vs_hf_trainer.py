"""bench/bench_vs_hf_trainer.py: train.py and the PEFT + transformers.Trainer recipe on the same model and records,
each in a process of its own; the table it writes, and the arithmetic behind its figures."""

import importlib.util
import os

import pytest

from conftest import REPO, TINY_BLOOM


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_vs_hf_trainer", REPO / "bench" / "bench_vs_hf_trainer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_figures_split_the_wall_time_and_count_the_loop_from_the_end_of_step_1():
    """Start-up, loop and tail add up to the wall time; the loop's tokens are those of steps 2..N; memory is the peak
    above the loaded model."""
    bench = load_bench()
    got = bench.figures(launch=100.0, ends=[110.0, 112.0, 116.0], tokens=[500, 900, 1500], exit_time=119.0,
                        baseline=2**30, peak=3 * 2**30, method="VmHWM")
    assert got["startup_s"] == 10.0 and got["loop_s"] == 6.0 and got["tail_s"] == 3.0 and got["wall_s"] == 19.0
    assert got["loop_tokens"] == 1000 and got["real_tokens"] == 1500 and got["steps"] == 3
    assert got["loop_us_per_token"] == pytest.approx(6.0e6 / 1000)
    assert got["loaded_gib"] == 1.0 and got["peak_above_gib"] == 2.0
    with pytest.raises(SystemExit, match="2 or more"):
        bench.figures(100.0, [110.0], [500], 119.0, 2**30, 2**30, "VmHWM")


@pytest.mark.slow
def test_both_sides_train_the_same_tokens_and_the_ratios_come_from_the_table(tmp_path):
    """The toy model, 16 records, one round (about 30 s on 2 cores): both sides run to the end, make the same
    number of steps on the same real tokens (within 1 %), and each ratio in the written table is ours / recipe of
    the figures beside it."""
    bench = load_bench()
    out = tmp_path / "vs.md"
    result = bench.main(["--model-path", str(TINY_BLOOM), "--records", "16", "--valid-records", "4",
                         "--max-length", "64", "--accum", "1", "--repeats", "1", "--out", str(out)])
    table = out.read_text()
    assert table.startswith("# train.py vs the usual recipe") and "Reproduce: `python bench/bench_vs_hf_trainer.py" \
        in table
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] in {label for _, label, _ in bench.ROWS}:
            rows[cells[0]] = cells[1:]
    assert len(rows) == len(bench.ROWS)
    for label, cells in rows.items():
        # Each figure as printed, +- half a unit of its last digit: the ratio must lie within what they allow.
        (ours, h_ours), (recipe, h_recipe), (ratio, h_ratio) = map(printed_value, cells)
        assert (ours - h_ours) / (recipe + h_recipe) - h_ratio <= ratio <= (ours + h_ours) / (recipe - h_recipe) \
            + h_ratio, label
    ours, recipe = (printed_value(cell)[0] for cell in rows["real tokens, all steps"][:2])
    assert abs(ours / recipe - 1) <= 0.01 and rows["optimizer steps"][:2] == ["4", "4"]
    assert [run["side"] for run in result["runs"]] == ["ours", "recipe"]
    assert all(run["peak_above_gib"] > 0 and run["loaded_gib"] > 0.1 for run in result["runs"])
    # CPU time: the process's own (at least a few seconds of imports and training), at most all cores all along.
    assert all(1 < run["cpu_s"] <= (os.cpu_count() + 0.5) * run["wall_s"] and 0 <= run["system_s"] < run["cpu_s"]
               for run in result["runs"])


def printed_value(cell: str) -> tuple[float, float]:
    """A table cell's number and half a unit of its last printed digit."""
    text = cell.replace(",", "")
    decimals = len(text.partition(".")[2])
    return float(text), 0.5 * 10.0 ** -decimals


def test_packing_report_takes_the_epoch_loop_from_the_loop_rate_and_names_the_cpu(tmp_path):
    """--packing: the epoch loop time is the loop time per real token x the epoch's real tokens, the ratios are
    ours / each recipe side, the bars are judged from them, and the device line names the CPU's matrix features."""
    bench = load_bench()
    args = bench.parse_args(["--packing", "--model-path", str(TINY_BLOOM), "--out", str(tmp_path / "p.md"),
                             "--repeats", "1"])
    runs = [{"side": side, "round": 1, "position": i + 1, "loop_us_per_token": us, "loop_s": 1.0, "steps": steps,
             "real_tokens": 10_000, "startup_s": 2.0, "wall_s": wall, **extra}
            for i, (side, us, steps, wall, extra) in enumerate([
                ("ours", 100.0, 5, 4.0, {"fill": 0.98, "rows": 40}), ("recipe", 160.0, 20, 5.0, {}),
                ("recipe-default", 250.0, 20, 8.0, {})])]
    result = bench.report_packing(args, [], TINY_BLOOM, runs, started=0.0)
    assert result["medians"]["ours"]["epoch_loop_s"] == pytest.approx(1.0)  # 100 us x 10,000 tokens
    assert result["ratios"]["recipe"]["epoch_loop_s"] == pytest.approx(100 / 160)
    assert result["ratios"]["recipe-default"]["epoch_loop_s"] == pytest.approx(100 / 250)
    assert result["ratios"]["recipe-default"]["wall_s"] == pytest.approx(4 / 8)
    table = (tmp_path / "p.md").read_text()
    assert "matrix features:" in table and "fill 0.980" in table
    assert "length grouping epoch loop time <= 0.7: holds (0.625)" in table
    assert "no grouping epoch loop time <= 0.5: holds (0.400)" in table
