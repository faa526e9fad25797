"""The summary's default view of a sweep: final accuracy per setting first, gaps only at the end of runs of
equal length, short labels, 80 columns and one screen; intervals too wide to mean anything are said so."""

import re
import sys

import numpy as np
import pytest
from test_summary import _summary, write_run

from cardinal import stats, summary
from cardinal.summary.render import render_markdown, render_table

FAST = {"recipe": "fast", "precision": "bf16", "channels_last": True, "device": "NVIDIA H200"}
SEED = {"device": "NVIDIA H200"}


def _curve(final, epochs):
    return [final * (e + 1) / (epochs + 1) for e in range(1, epochs)] + [final]


@pytest.fixture
def sweep(tmp_path):
    """Like a real sweep: two archs under the reference recipe (3 seeds, 10 epochs), and the fast recipe at
    1, 3 and 10 epochs with several batches and LRs (one seed each)."""
    for seed in range(3):
        write_run(tmp_path / f"seed-r50-{seed}", "resnet50", seed, _curve(74.2 + seed * 0.3, 10), **SEED)
        write_run(tmp_path / f"seed-rx50-{seed}", "resnext50_32x4d", seed, _curve(73.8 + seed * 0.4, 10),
                  img_per_s=[500.0] + [700.0 + seed] * 9, **SEED)
    fast = [("fast-r50-e1", "resnet50", 1, 32, 0.1, 40.5), ("fast-r50-e3", "resnet50", 3, 32, 0.1, 55.8),
            ("fast-rx50-e3", "resnext50_32x4d", 3, 32, 0.1, 58.0),
            ("fast-r50-e10-b256", "resnet50", 10, 256, 1.6, 82.6),
            ("fast-r50-e10-b512", "resnet50", 10, 512, 0.4, 84.4)]
    for name, arch, epochs, batch, lr, final in fast:
        write_run(tmp_path / name, arch, 0, _curve(final, epochs), overrides={"batch_size": batch, "lr": lr},
                  **FAST)
    return tmp_path


def _words(text):
    return {word for word in text.split() if not set(word) <= set("─━│┃")}


def test_sweep_answer_fits_80_columns_and_about_one_screen(sweep, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = _summary([sweep], capsys)
    lines = out.splitlines()
    assert code == 0 and err == ""
    assert max(len(line) for line in lines) <= 80 and len(lines) <= 40  # 8 gaps; seed at 1 and 3 epochs in the table
    gaps = next(i for i, line in enumerate(lines) if line.startswith("Gaps at the end"))
    assert gaps + 3 < 24  # the final table and the first gap are on the first screen
    wide = render_table(summary.summarize([sweep]), 400)
    assert _words(out) <= _words(wide)  # lines wrap between words, never inside one
    assert "Final test accuracy" in lines[2] or "Final test accuracy" in lines[3]


def test_final_rows_are_sorted_and_labelled_by_what_differs(sweep):
    result = summary.summarize([sweep])
    text = render_table(result, 120)
    lines = text.splitlines()
    assert lines[0].startswith("Shared: synthetic") and text.count("NVIDIA H200") == 1  # said once
    assert "By recipe: fast = bf16, channels_last; seed = fp32, NCHW, batch 128." in text
    start = next(i for i, line in enumerate(lines) if line.startswith("Setting")) + 2
    rows = lines[start:start + 7]
    accuracies = [float(re.split(r"\s{2,}", row)[3]) for row in rows]
    assert accuracies == sorted(accuracies, reverse=True) and accuracies[0] == pytest.approx(84.4)
    labels = [re.split(r"\s{2,}", row)[0] for row in rows]
    assert "resnet50 (seed)" in labels and "resnet50 (fast, lr=0.4, batch 512)" in labels
    assert not any("bf16" in label or "H200" in label or "epochs" in label for label in labels)
    seed_row = next(row for row in rows if row.startswith("resnet50 (seed)"))
    assert re.split(r"\s{2,}", seed_row)[1:3] == ["10", "3"]  # epochs, seeds
    assert "± " in seed_row and "1 seed" in rows[0]


def test_gaps_compare_only_the_ends_of_runs_of_equal_length(sweep):
    """Ends of runs of equal length, or the end of a short run beside the same epoch of a constant-LR (seed)
    run, whose epoch k is a k-epoch run; never epoch k of a one-cycle run against the end of a short one."""
    result = summary.summarize([sweep])
    groups = result.groups
    gaps = result.final_gaps
    for m, b, epoch in zip(gaps["model_index"], gaps["baseline_index"], gaps["epoch"]):
        short, long = sorted((groups[m], groups[b]), key=lambda g: g.length)
        assert epoch == short.length and (long.length == short.length or long.epochs_are_runs)
    assert list(gaps["epoch"]) == [10, 10, 10, 10, 3, 3, 3, 1]
    assert sorted(gaps["kind"]) == ["arch", "arch"] + ["recipe"] * 6
    recipes = gaps[gaps["kind"] == "recipe"]
    fast_pair = recipes[recipes["baseline"].str.contains("fast")]
    assert fast_pair["gap"].tolist() == [pytest.approx(84.4 - 82.6)]
    against_seed = recipes[recipes["baseline"] == "resnet50 (seed, fp32, NCHW)"].set_index("model")
    seed_at = {e: np.mean([_curve(74.2 + s * 0.3, 10)[e - 1] for s in range(3)]) for e in (1, 3, 10)}
    expected = [82.6 - seed_at[10], 84.4 - seed_at[10], 55.8 - seed_at[3], 40.5 - seed_at[1]]
    assert sorted(against_seed["gap"]) == pytest.approx(sorted(expected))
    for model, baseline in summary.recipe_pairs(groups):  # the per-epoch recipe gaps (--all) follow the rule
        assert model.length == baseline.length or baseline.epochs_are_runs
    assert not any(line.startswith("At epoch 1, resnet50 (fast, epochs=10") for line in result.takeaways)
    assert set(result.recipe_gaps.loc[result.recipe_gaps["model"].str.contains("epochs=3"), "epoch"]) == {3}


def test_unfinished_setting_shows_how_far_it_got_and_gets_no_final_gap(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / f"a{seed}", "tiny_resnet", seed, [40.0, 50.0, 60.0])
        write_run(tmp_path / f"b{seed}", "tiny_resnext", seed, [41.0, 52.0], planned=3)
    result = summary.summarize([tmp_path])
    assert result.final_gaps.empty
    text = render_table(result, 80)
    assert re.search(r"tiny_resnext\s+2 of 3\s", text) and "No gaps" in text and "sig./n.s." not in text
    everything = " ".join(render_table(result, 80, everything=True).split())
    assert "Test accuracy gaps, like with like" in everything  # epochs 1 and 2, each with its verdict...
    assert "No gaps at the end of runs" in everything and "sig./n.s.: the gap's 95% interval" in everything  # ...read


def test_intervals_too_wide_to_mean_anything_are_said_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    for seed, (acc, speed) in enumerate(((10.0, 20.0), (90.0, 9000.0))):
        write_run(tmp_path / f"a{seed}", "tiny_resnet", seed, [5.0, acc], img_per_s=[10.0, speed])
        write_run(tmp_path / f"b{seed}", "tiny_resnext", seed, [5.0, 50.0 + seed], img_per_s=[10.0, 500.0 + seed])
    result = summary.summarize([tmp_path])
    (speed,) = result.speeds.itertuples()
    assert speed.low < 0.01 and speed.high > 10 and speed.too_wide  # [0.0x, 23x]: says nothing
    code, out, _ = _summary([tmp_path, "--all"], capsys)
    assert code == 0 and "too wide: 2 seeds" in out and "too wide" in out.split("Final test")[1]
    flat = " ".join(out.split())
    assert "its 95% interval is too wide to mean anything (2 vs 2 runs)" in flat
    assert not re.search(r"\[0\.0+, ", out)  # no interval starting at a rounded zero
    assert "its 95% interval is too wide to mean anything, not distinguishable at 95%" in flat


def test_plot_without_matplotlib_fails_before_printing_anything(tmp_path, capsys, monkeypatch):
    write_run(tmp_path / "r", "tiny_resnet", 0, [50.0])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    code, out, err = _summary([tmp_path, "--plot", tmp_path / "p.png"], capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and "cardinal[plot]" in err
    assert not (tmp_path / "p.png").exists()


def test_help_documents_all(capsys):
    code, out, _ = _summary(["--help"], capsys)
    assert code == 0 and "--all" in " ".join(out.split()) and "per-epoch results" in " ".join(out.split())


def test_one_recipe_run_two_ways_gets_a_gap_with_a_verdict(tmp_path):
    """Compiled against eager (all else equal): does compiling change the result? A verdict, not a refusal."""
    for seed, (eager, compiled) in enumerate([(60.0, 60.4), (62.0, 61.5), (61.0, 61.3)]):
        write_run(tmp_path / f"eager{seed}", "tiny_resnet", seed, _curve(eager, 3), recipe="fast")
        write_run(tmp_path / f"compiled{seed}", "tiny_resnet", seed, _curve(compiled, 3), recipe="fast",
                  compiled="reduce-overhead")
    write_run(tmp_path / "seed-recipe", "tiny_resnet", 0, _curve(50.0, 3), compiled="reduce-overhead")
    gaps = summary.summarize([tmp_path]).final_gaps
    (setup,) = gaps[gaps["kind"] == "setup"].itertuples()
    assert setup.gap == pytest.approx(np.mean([0.4, -0.5, 0.3]) * (1 if "compiled" in setup.model else -1))
    assert setup.method == "paired" and setup.verdict == stats.NOT_DISTINGUISHABLE
    (recipe,) = gaps[gaps["kind"] == "recipe"].itertuples()  # fast eager vs seed compiled: two differences
    assert "compiled" in recipe.model and "compiled" in recipe.baseline


def test_a_knob_given_by_flag_and_the_same_value_sized_by_the_budget_rule_are_one_setting(tmp_path):
    """How a knob got its value (sized_by_budget, budget_images) is bookkeeping: the runs compute the same."""
    sized = {"batch_size": 64, "lr": 0.02, "sized_by_budget": ("batch_size", "lr"), "budget_images": 2048}
    write_run(tmp_path / "sized", "tiny_resnet", 0, [40.0, 50.0], recipe="fast", overrides=sized)
    write_run(tmp_path / "given", "tiny_resnet", 1, [41.0, 51.0], recipe="fast",
              overrides={"batch_size": 64, "lr": 0.02, "sized_by_budget": (), "budget_images": 0})
    write_run(tmp_path / "other-lr", "tiny_resnet", 0, [42.0, 52.0], recipe="fast",
              overrides={**sized, "lr": 0.04})
    result = summary.summarize([tmp_path])
    assert sorted(len(g.runs) for g in result.groups) == [1, 2]
    assert not any("sized_by_budget" in g.label or "budget_images" in g.label for g in result.groups)


@pytest.fixture
def lr_sweep(tmp_path):
    """Four LRs of one recipe and the reference recipe, 2 seeds each, all 3 epochs long."""
    finals = {0.05: 61.0, 0.1: 64.0, 0.2: 66.0, 0.4: 58.0}
    for lr, final in finals.items():
        for seed in (0, 1):
            write_run(tmp_path / f"fast-lr{lr}-{seed}", "tiny_resnet", seed, _curve(final + seed, 3), recipe="fast",
                      overrides={"lr": lr})
    for seed in (0, 1):
        write_run(tmp_path / f"seed-{seed}", "tiny_resnet", seed, _curve(40.0 + seed, 3))
    return tmp_path


def test_a_sweep_is_answered_each_setting_against_its_best(lr_sweep, capsys, monkeypatch):
    result = summary.summarize([lr_sweep])
    gaps = result.final_gaps
    against_seed = gaps[gaps["baseline"].str.contains("seed")]
    assert len(against_seed) == 4 and (against_seed["gap"] > 0).all() and not against_seed["against_best"].any()
    sweep = gaps[~gaps["baseline"].str.contains("seed")]
    assert len(sweep) == 3 and sweep["against_best"].all()  # not the 6 pairs of four settings
    assert set(sweep["model"]) == {"tiny_resnet (fast, lr=0.2)"}
    assert sweep["gap"].tolist() == pytest.approx([2.0, 5.0, 8.0])  # next best first, as the final table
    fast_pairs = result.recipe_gaps[~result.recipe_gaps["baseline"].str.contains("seed")]
    assert len(fast_pairs) == 2 * 3 and set(fast_pairs["model"]) == {"tiny_resnet (fast, lr=0.2)"}  # epochs 1 and 3
    assert sum("(--every-pair shows them)" in line and "the 3 pairs among" in line for line in result.notes) == 1
    every = summary.summarize([lr_sweep], every_pair=True)
    every_fast = every.recipe_gaps[~every.recipe_gaps["baseline"].str.contains("seed")]
    assert len(every_fast[every_fast["epoch"] == 3]) == 6 and not any("--every-pair" in n for n in every.notes)
    assert every.final_gaps.equals(gaps)  # the answer is the same either way
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = _summary([lr_sweep], capsys)
    assert code == 0 and "each against the best of them" in " ".join(out.split())
    for flags, shown in (([], "the 3 pairs among the others (--every-pair shows them)"), (["--every-pair"], "")):
        code, out, _ = _summary([lr_sweep, "--all", *flags], capsys)
        assert code == 0 and shown in " ".join(out.split()) and ("lr=0.1 vs lr=0.05" in out) == bool(flags)


def test_two_or_three_settings_keep_every_pair(tmp_path):
    for lr, final in ((0.1, 60.0), (0.2, 62.0)):
        for seed in (0, 1):
            write_run(tmp_path / f"lr{lr}-{seed}", "tiny_resnet", seed, _curve(final + seed, 3), recipe="fast",
                      overrides={"lr": lr})
    write_run(tmp_path / "resnext", "tiny_resnext", 0, _curve(61.0, 3), recipe="fast", overrides={"lr": 0.1})
    gaps = summary.summarize([tmp_path]).final_gaps
    assert len(gaps) == 2 and not gaps["against_best"].any()


def test_the_per_epoch_tables_name_settings_by_what_tells_them_apart(lr_sweep):
    write_run(lr_sweep / "fast-lr0.2-long", "tiny_resnet", 0, _curve(70.0, 5), recipe="fast", overrides={"lr": 0.2})
    result = summary.summarize([lr_sweep])
    text = render_markdown(result)

    def first_cells(section: str) -> list[str]:
        rows = text.split(f"## {section}")[1].split("\n## ")[0].splitlines()[4:]
        return [row.split("|")[1].strip() for row in rows if row.startswith("|")]

    names = first_cells("Results per epoch")
    assert set(names) - {""} == {"fast, epochs=3, lr=0.05", "fast, epochs=3, lr=0.1", "fast, epochs=3, lr=0.2",
                                 "fast, epochs=3, lr=0.4", "fast, epochs=5, lr=0.2", "seed"}  # the length: it varies
    assert names[:2] == ["fast, epochs=3, lr=0.05", ""]  # each setting named once above its epochs
    pairs = set(first_cells("Recipe gaps"))
    assert {"lr=0.2 vs lr=0.05 (fast, epochs=3)", "fast, epochs=3, lr=0.05 vs seed"} <= pairs
    takeaways = " ".join(render_table(result, 400, everything=True).split("Takeaways")[1].split())
    assert "Compared only arch by arch" not in takeaways  # one arch: all there is to compare is compared
    assert "tiny_resnet (fast, epochs=5, lr=0.2)" in takeaways  # sentences keep the full names


def test_a_sweep_of_archs_under_the_reference_recipe_is_answered_against_its_best(tmp_path):
    finals = {"tiny_resnet": 60.0, "tiny_resnext": 63.0, "resnext50_flat128": 61.0}
    for arch, final in finals.items():
        for seed in (0, 1):
            write_run(tmp_path / f"{arch}-{seed}", arch, seed, _curve(final + seed, 3))
    gaps = summary.summarize([tmp_path]).final_gaps
    assert len(gaps) == 2 and gaps["against_best"].all() and set(gaps["kind"]) == {"arch"}
    assert set(gaps["model"]) == {"tiny_resnext (seed)"} and gaps["gap"].tolist() == pytest.approx([2.0, 3.0])


def test_one_recipe_at_several_lengths_is_said_apart_once_not_pair_by_pair(tmp_path):
    for epochs, lr in ((1, 0.1), (3, 0.2), (5, 0.4)):
        for arch in ("tiny_resnet", "tiny_resnext"):
            write_run(tmp_path / f"{arch}-{epochs}", arch, 0, _curve(60.0, epochs), recipe="fast",
                      overrides={"lr": lr})
    write_run(tmp_path / "other-data", "tiny_resnet", 0, _curve(60.0, 3), recipe="fast", dataset="cifar10",
              overrides={"lr": 0.2})
    lines = [line for line in summary.summarize([tmp_path]).takeaways if line.startswith("Not compared")]
    by_length = [line for line in lines if "different lengths" in line]
    assert len(by_length) == 1 and "1 epoch: " in by_length[0] and "; 5 epochs: " in by_length[0]
    assert "tiny_resnext (fast, synthetic, epochs=3, lr=0.2)" in by_length[0] and "cifar10" not in by_length[0]
    assert all("dataset " in line for line in lines if line not in by_length)  # said pair by pair, as before
    assert len(lines) == 1 + 3  # the other data set against each length


def test_a_plot_of_many_settings_names_them_as_the_tables_do_and_draws_no_two_alike(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from cardinal.summary import plot as plot_module

    lrs = [0.01 * 2 ** k for k in range(12)]  # more settings than colours
    for lr in lrs:
        write_run(tmp_path / f"lr{lr}", "tiny_resnet", 0, _curve(60.0, 2), recipe="fast", overrides={"lr": lr})
    drawn = {}
    monkeypatch.setattr(plot_module, "save_figure", lambda figure, path: drawn.update(figure=figure))
    plot_module.plot(summary.summarize([tmp_path]), tmp_path / "sweep.png")
    figure = drawn["figure"]
    entries = figure.legends[0]
    assert [t.get_text() for t in entries.get_texts()][:2] == ["lr=0.01 (n=1)", "lr=0.02 (n=1)"]
    assert "Shared: tiny_resnet, recipe fast" in figure._suptitle.get_text()
    looks = {(line.get_color(), line.get_marker(), line.get_linestyle()) for line in entries.get_lines()}
    assert len(looks) == len(lrs)
    speed = figure.axes[2]
    assert [t.get_text() for t in speed.get_yticklabels()][0] == "lr=0.01"  # bars named as the legend
    assert len({(bar.get_facecolor(), bar.get_hatch()) for bar in speed.patches}) == len(lrs)
    import matplotlib

    colors = matplotlib.colormaps["tab10"]
    styles = [plot_module.Style(i) for i in range(250)]
    assert len({(s.color(colors), s.marker, str(s.line)) for s in styles}) == 250
    assert len({(s.color(colors), s.hatch) for s in styles[:50]}) == 50


def test_the_csv_carries_every_knob_so_a_sweep_pivots_on_them(lr_sweep, capsys):
    from test_summary import _csv

    table = _csv([lr_sweep], capsys)
    fast = table[(table["recipe"] == "fast") & (table["epoch"] == 3)]
    assert sorted(fast["recipe.lr"]) == [0.05, 0.1, 0.2, 0.4] and set(fast["recipe.epochs"]) == {3}
    by_lr = fast.set_index("recipe.lr")["test_acc"]
    assert by_lr.idxmax() == 0.2 and by_lr[0.2] == pytest.approx(66.5)  # seeds 0 and 1: 66 and 67
    assert {"recipe.weight_decay", "recipe.optimizer", "grad_accum"} <= set(table.columns)


def test_a_length_apart_never_hides_another_difference(tmp_path):
    for epochs, overrides in ((1, {}), (3, {}), (4, {"optimizer": "adamw", "lr": 0.001}), (2, {"label_smoothing": 0})):
        write_run(tmp_path / f"fast-{epochs}", "tiny_resnet", 0, _curve(60.0, epochs), recipe="fast",
                  overrides=overrides)
    write_run(tmp_path / "cosine-2", "tiny_resnet", 0, _curve(50.0, 2), overrides={"schedule": "cosine"})
    write_run(tmp_path / "cosine-3", "tiny_resnet", 0, _curve(50.0, 3), overrides={"schedule": "cosine"})
    lines = [line for line in summary.summarize([tmp_path]).takeaways if line.startswith("Not compared")]
    by_length = [line for line in lines if "different lengths" in line]
    assert len(by_length) == 2  # fast's two default sets; seed's two cosine sets: one line per recipe
    fast_line = next(line for line in by_length if "fast" in line)
    assert "1 epoch: " in fast_line and "3 epochs: " in fast_line and "adamw" not in fast_line
    assert not re.search(r"label_smoothing=0[,)]", fast_line) and "seed" not in fast_line
    assert any("optimizer muon vs adamw" in line or "optimizer adamw vs muon" in line for line in lines)
    assert any("label_smoothing 0 vs 0.1" in line or "label_smoothing 0.1 vs 0" in line for line in lines)


def _grid(result):
    from cardinal.summary.group import legend
    from cardinal.summary.render import sweep_grid_view

    return sweep_grid_view(result, legend(result.groups))


def test_a_sweep_of_two_knobs_is_also_shown_as_a_grid(tmp_path, capsys, monkeypatch):
    for lr in (0.4, 0.1, 0.2):  # written out of order: the grid sorts numbers
        for batch in (128, 64):
            if (lr, batch) == (0.4, 64):
                continue  # a combination not run reads "-"
            write_run(tmp_path / f"lr{lr}-b{batch}", "tiny_resnet", 0, _curve(60.0 + 10 * lr + batch / 64, 3),
                      recipe="fast", overrides={"lr": lr, "batch_size": batch})
    grid = _grid(summary.summarize([tmp_path]))
    assert grid.headers == ["lr", "batch 64", "batch 128"]
    assert grid.rows == [["lr=0.1", "62.00", "63.00"], ["lr=0.2", "63.00", "64.00"], ["lr=0.4", "-", "66.00"]]
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = _summary([tmp_path], capsys)
    assert code == 0 and "Final test accuracy % by lr and global batch" in out


def test_no_grid_for_one_knob_several_lengths_or_unfinished_runs(tmp_path, lr_sweep):
    assert _grid(summary.summarize([lr_sweep])) is None  # one knob (and the reference recipe)
    for lr in (0.1, 0.2):
        for epochs in (2, 3):
            write_run(tmp_path / f"lr{lr}-e{epochs}", "tiny_resnet", 0, _curve(60.0, epochs), recipe="fast",
                      overrides={"lr": lr})
    assert _grid(summary.summarize([tmp_path])) is None  # lr x length: lengths are never a grid's axis
    unfinished = tmp_path / "unfinished"
    for lr in (0.1, 0.2):
        for batch in (64, 128):
            write_run(unfinished / f"lr{lr}-b{batch}", "tiny_resnet", 0, _curve(60.0, 2 if lr == 0.1 else 3),
                      recipe="fast", overrides={"lr": lr, "batch_size": batch}, planned=3)
    result = summary.summarize([unfinished])
    assert not result.finals["finished"].all() and result.finals["length"].nunique() == 1
    assert _grid(result) is None  # lr=0.1 stopped at 2 of 3 epochs


def test_the_final_table_holds_both_sides_of_a_gap_read_at_a_stand_in_epoch(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / f"seed-{seed}", "tiny_resnet", seed, [30.0 + seed, 40.0 + seed, 45.0, 50.0])
        write_run(tmp_path / f"fast-{seed}", "tiny_resnet", seed, [50.0 + seed, 60.0 + seed], recipe="fast")
    result = summary.summarize([tmp_path])
    finals = result.finals.set_index(["model", "epoch"])
    assert bool(finals.loc[("tiny_resnet (seed)", 2), "stand_in"]) and finals.loc[("tiny_resnet (seed)", 2),
                                                                                  "test_acc"] == 40.5
    assert not finals.loc[("tiny_resnet (seed)", 4), "stand_in"] and len(finals) == 3
    gap = result.final_gaps.iloc[0]
    assert (gap["epoch"], gap["baseline_value"]) == (2, 40.5)  # the row the table shows
    text = render_table(result, 80)
    assert re.search(r"seed\s+2 in 4\s+40\.50", text) and "k in n (seed): epoch k of n-epoch runs" in " ".join(
        text.split())


def test_a_stand_in_reads_apart_from_an_unfinished_run(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / f"seed-{seed}", "tiny_resnet", seed, [30.0 + seed, 40.0, 45.0, 50.0, 52.0], planned=10)
        write_run(tmp_path / f"fast-{seed}", "tiny_resnet", seed, [50.0 + seed, 55.0, 60.0 + seed], recipe="fast")
    text = render_table(summary.summarize([tmp_path]), 80)
    assert re.search(r"seed\s+5 of 10\s", text) and re.search(r"seed\s+3 in 10\s", text)


def test_runs_without_config_still_make_a_grid(tmp_path):
    for arch in ("tiny_resnet", "tiny_resnext"):
        for batch in (64, 128):
            write_run(tmp_path / f"{arch}-{batch}", arch, 0, _curve(60.0 + batch / 64, 2), config=False,
                      overrides={"batch_size": batch})
    result = summary.summarize([tmp_path])
    grid = _grid(result)
    assert grid is not None and grid.headers == ["arch", "batch 64", "batch 128"]
    assert "recipe unresolved" in render_table(result, 80).split("\n")[0]  # said once, above the table
