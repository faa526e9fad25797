"""The comparison summary: which runs are replicates, like-with-like comparisons, intervals and verdicts.

Most tests build run folders by hand (epochs.csv with the real column set + config.json as train writes it),
so they are fast and every number is known. The study tests at the end train real tiny runs (slow).
"""

import io
import json
import math
import os
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from cardinal import stats, summary
from cardinal.cli import run
from cardinal.config import RECIPES, TrainConfig
from cardinal.records import COLUMNS, CONFIG_NAME, CSV_NAME

from conftest import cli

ARCHS = ("tiny_resnet", "tiny_resnext")


# --------------------------------------------------------------------------------------------- fixtures
def write_run(folder, arch, seed, accs, *, recipe="seed", overrides=None, planned=None, precision="no",
              channels_last=False, compiled=False, world_size=1, device="cpu (2 threads)", img_per_s=None,
              dataset="synthetic", train_images=2048, extra=None, config=True, mtime=None):
    """A run folder as cardinal.train leaves it: every records.COLUMNS column, one row per epoch, and
    config.json = TrainConfig(...).to_json(). ``img_per_s`` is one value per epoch (default: a slow
    first epoch, then steady)."""
    folder.mkdir(parents=True, exist_ok=True)
    knobs = replace(RECIPES[recipe], epochs=planned or len(accs), **(overrides or {}))
    speeds = img_per_s or [500.0] + [1000.0 + 10 * seed] * (len(accs) - 1)
    rows = []
    for epoch, (acc, speed) in enumerate(zip(accs, speeds), 1):
        train_time = train_images / speed
        row = dict.fromkeys(COLUMNS)
        row.update(epoch=epoch, train_loss=2.0 / epoch, train_acc=max(acc - 3.0, 0.0), test_loss=1.8 / epoch,
                   test_acc=acc,
                   lr=knobs.lr, epoch_time_s=train_time + 0.5, train_time_s=train_time, eval_time_s=0.5,
                   steps=train_images // knobs.batch_size, it_per_s=train_images / knobs.batch_size / train_time,
                   img_per_s=speed, train_tflop_per_s=speed * 3 * 0.02 / 1000, peak_mem_mb=0.0, warm_up=epoch == 1,
                   train_images=train_images, test_images=512, run_name=folder.name, arch=arch, dataset=dataset,
                   recipe=recipe, params=100_000, gflops=0.02, image_size=32, global_batch=knobs.batch_size,
                   world_size=world_size, precision=precision, channels_last=channels_last, compiled=compiled,
                   device=device, torch_version="2.x", accelerate_version="1.x", cardinal_version="0.x",
                   seed=seed, command="python -m cardinal.train")
        row.update({k: v[epoch - 1] for k, v in (extra or {}).items()})
        rows.append(row)
    pd.DataFrame(rows).to_csv(folder / CSV_NAME, index=False)
    if config:
        train_config = TrainConfig(arch=arch, dataset=dataset, recipe_name=recipe, recipe=knobs, seed=seed,
                                   mixed_precision=None if precision == "no" else precision,
                                   channels_last=channels_last, compile=compiled)
        (folder / CONFIG_NAME).write_text(train_config.to_json())
    if mtime is not None:
        os.utime(folder / CSV_NAME, (mtime, mtime))
    return folder


RESNET_ACCS = ([30.0, 40.0, 45.0], [31.0, 41.5, 46.0], [29.5, 39.0, 44.5])
RESNEXT_ACCS = ([33.0, 43.0, 49.0], [34.0, 44.5, 50.5], [32.0, 42.0, 48.0])


@pytest.fixture
def mixed(tmp_path):
    """3 seeds of tiny_resnet, 3 of tiny_resnext, 1 bf16 tiny_resnet, and an older re-run of seed 0."""
    for seed, accs in enumerate(RESNET_ACCS):
        write_run(tmp_path / f"tiny_resnet-seed{seed}", "tiny_resnet", seed, accs, mtime=2_000_000 + seed)
    for seed, accs in enumerate(RESNEXT_ACCS):
        write_run(tmp_path / f"tiny_resnext-seed{seed}", "tiny_resnext", seed, accs, img_per_s=[400, 800, 810],
                  mtime=2_000_000 + seed)
    write_run(tmp_path / "tiny_resnet-bf16-seed0", "tiny_resnet", 0, [30.5, 40.5, 45.5], precision="bf16")
    write_run(tmp_path / "tiny_resnet-seed0-first-try", "tiny_resnet", 0, [10.0, 11.0, 12.0], mtime=1_000_000)
    return tmp_path


def _summary(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(summary.main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def _csv(argv, capsys):
    code, out, err = _summary([*argv, "--format", "csv"], capsys)
    assert code == 0, err
    return pd.read_csv(io.StringIO(out))


# ------------------------------------------------------------------------------------ the whole picture
def test_mixed_runs_make_three_groups_with_intervals_and_a_verdict(mixed, capsys):
    table = _csv([mixed], capsys)
    last = table[table["epoch"] == 3].set_index("model")
    assert sorted(last["runs"]) == [1, 3, 3]
    assert last.loc["tiny_resnet (seed, fp32)", "test_acc"] == pytest.approx(np.mean([a[-1] for a in RESNET_ACCS]))
    three = last[last["runs"] == 3]
    assert np.isfinite(three["test_acc_ci95"]).all() and np.isfinite(three["test_acc_std"]).all()
    assert math.isnan(last.loc["tiny_resnet (seed, bf16)", "test_acc_ci95"])

    code, out, _ = _summary([mixed, "--format", "markdown"], capsys)
    assert code == 0
    verdicts = [line for line in out.splitlines() if line.startswith("- At epoch 3, tiny_resnext (seed, fp32)")]
    assert len(verdicts) == 1 and "95% interval" in verdicts[0] and "significant at 95%" in verdicts[0]
    assert "tiny_resnet-seed0-first-try" in out and "counts once" in out
    assert "Compared only arch by arch, as setup gaps" in out and "precision fp32 vs bf16" in out


def test_summarize_returns_groups_runs_and_tables(mixed):
    result = summary.summarize([mixed])
    assert [g.label for g in result.groups] == ["tiny_resnet (seed, bf16)", "tiny_resnet (seed, fp32)",
                                                "tiny_resnext (seed, fp32)"]  # comparable models side by side
    assert len(result.runs) == 7 and [r.folder.name for r in result.groups[1].dropped] == [
        "tiny_resnet-seed0-first-try"]
    assert set(result.gaps["epoch"]) == {1, 3} and set(result.gaps["model"]) == {"tiny_resnext (seed, fp32)"}


# ------------------------------------------------------------------------------------------- grouping
def test_runs_differing_only_in_arch_are_labelled_by_arch_and_recipe(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / f"a{seed}", "tiny_resnet", seed, [40.0 + seed])
        write_run(tmp_path / f"b{seed}", "tiny_resnext", seed, [42.0 + seed])
    result = summary.summarize([tmp_path])
    assert [g.label for g in result.groups] == ["tiny_resnet (seed)", "tiny_resnext (seed)"]
    assert [len(g.runs) for g in result.groups] == [2, 2]


@pytest.mark.parametrize("change, label, difference", [
    ({"precision": "bf16"}, "bf16", "precision bf16 vs fp32"),
    ({"channels_last": True}, "channels_last", "memory format channels_last vs NCHW"),
    ({"compiled": True}, "compiled", "compilation compiled vs eager"),
    ({"world_size": 2}, "2 processes", "world size 2 vs 1"),
    ({"device": "NVIDIA H100"}, "NVIDIA H100", "device NVIDIA H100 vs cpu (2 threads)"),
    ({"overrides": {"lr": 0.05}}, "lr=0.05", "lr 0.05 vs 0.01"),
    ({"overrides": {"batch_size": 256}}, "batch 256", "global batch 256 vs 128"),
    ({"recipe": "fast"}, "(fast", "recipe fast vs seed"),
    ({"dataset": "cifar10"}, "cifar10", "dataset cifar10 vs synthetic"),
    ({"train_images": 1024}, "1024 train img", "training images per epoch 1024 vs 2048"),
])
def test_a_changed_condition_splits_groups_names_it_and_blocks_comparison(tmp_path, change, label, difference):
    for seed in (0, 1):
        write_run(tmp_path / f"base{seed}", "tiny_resnet", seed, [40.0, 50.0])
        write_run(tmp_path / f"other{seed}", "tiny_resnext", seed, [41.0, 52.0], **change)
    result = summary.summarize([tmp_path])
    base, other = result.groups
    assert len(base.runs) == len(other.runs) == 2
    assert label in other.label and label not in base.label
    assert result.gaps.empty and result.speeds.empty  # different conditions: no comparison at all
    not_compared = [line for line in result.takeaways if line.startswith("Not compared")]
    assert len(not_compared) == 1 and difference in not_compared[0]


def test_same_arch_under_two_precisions_are_two_labelled_groups(tmp_path):
    write_run(tmp_path / "fp32", "resnet50", 0, [50.0], recipe="fast")
    write_run(tmp_path / "bf16", "resnet50", 0, [49.0], recipe="fast", precision="bf16")
    assert sorted(g.label for g in summary.summarize([tmp_path]).groups) == ["resnet50 (fast, bf16)",
                                                                             "resnet50 (fast, fp32)"]


def test_a_rerun_of_a_seed_counts_once_newest_complete_kept(tmp_path):
    write_run(tmp_path / "old", "tiny_resnet", 0, [10.0, 20.0], mtime=1_000)
    write_run(tmp_path / "new", "tiny_resnet", 0, [30.0, 40.0], mtime=2_000)
    write_run(tmp_path / "newest-unfinished", "tiny_resnet", 0, [50.0], planned=2, mtime=3_000)
    write_run(tmp_path / "seed1", "tiny_resnet", 1, [32.0, 42.0], mtime=1_500)
    result = summary.summarize([tmp_path])
    (group,) = result.groups
    assert sorted(r.folder.name for r in group.runs) == ["new", "seed1"]
    assert sorted(r.folder.name for r in group.dropped) == ["newest-unfinished", "old"]
    row = result.results.set_index("epoch").loc[2]
    assert row["runs"] == 2 and row["test_acc"] == pytest.approx(41.0)
    (note,) = [line for line in result.notes if line.startswith("Seed 0")]
    assert "run 3 times" in note and "newest complete" in note
    assert "newest-unfinished" in note and "old" in note


def test_without_a_finished_rerun_the_newest_is_kept(tmp_path):
    write_run(tmp_path / "a", "tiny_resnet", 0, [10.0], planned=5, mtime=1_000)
    write_run(tmp_path / "b", "tiny_resnet", 0, [20.0], planned=5, mtime=2_000)
    (group,) = summary.summarize([tmp_path]).groups
    assert [r.folder.name for r in group.runs] == ["b"] and [r.folder.name for r in group.dropped] == ["a"]


def test_missing_config_falls_back_to_the_recipe_column_and_says_so(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / f"a{seed}", "tiny_resnet", seed, [40.0], config=False)
        write_run(tmp_path / f"b{seed}", "tiny_resnext", seed, [41.0], config=False)
    write_run(tmp_path / "resolved", "tiny_resnet", 0, [40.0])
    result = summary.summarize([tmp_path])
    assert [len(g.runs) for g in result.groups] == [2, 2, 1]
    assert "recipe unresolved" in result.groups[0].label and "recipe unresolved" not in result.groups[2].label
    assert any("could not be resolved" in line and "a0" in line for line in result.notes)
    assert len(result.gaps) == 1  # the two unresolved groups share the recipe name: compared, with the note
    assert any("could not be resolved" in line for line in result.takeaways if line.startswith("Not compared"))


def test_a_run_named_twice_counts_once(tmp_path):
    write_run(tmp_path / "r", "tiny_resnet", 0, [50.0])
    result = summary.summarize([tmp_path, tmp_path / "r", tmp_path / "r" / CSV_NAME])
    assert result.results.iloc[0]["runs"] == 1 and result.models.iloc[0]["runs"] == 1
    assert not result.groups[0].dropped


# ---------------------------------------------------------------------------------------- statistics
def test_mean_std_and_ci_of_seeds_match_scipy(tmp_path):
    accs = [60.0, 64.0, 71.0]
    for seed, acc in enumerate(accs):
        write_run(tmp_path / f"s{seed}", "tiny_resnet", seed, [50.0, acc])
    row = summary.summarize([tmp_path], epochs=[2]).results.iloc[0]
    low, high = scipy_stats.t.interval(0.95, 2, loc=np.mean(accs), scale=scipy_stats.sem(accs))
    assert row["test_acc"] == pytest.approx(65.0) and row["test_acc_std"] == pytest.approx(np.std(accs, ddof=1))
    assert row["test_acc_ci95"] == pytest.approx((high - low) / 2) and row["runs"] == 3


A = [50.1, 52.3, 51.0, 53.4]
B = [48.0, 49.9, 50.5, 47.2]


def test_welch_interval_matches_scipy():
    interval = stats.welch_interval(A, B[:3])
    expected = scipy_stats.ttest_ind(A, B[:3], equal_var=False).confidence_interval(0.95)
    assert (interval.low, interval.high) == pytest.approx((expected.low, expected.high))
    assert interval.estimate == pytest.approx(np.mean(A) - np.mean(B[:3])) and interval.method == "Welch"


def test_paired_interval_matches_scipy():
    interval = stats.paired_interval(A, B)
    expected = scipy_stats.ttest_rel(A, B).confidence_interval(0.95)
    assert (interval.low, interval.high) == pytest.approx((expected.low, expected.high))


def test_gap_is_paired_only_when_both_sides_ran_the_same_seeds():
    paired = stats.gap_interval(A, B, seeds_a=[0, 1, 2, 3], seeds_b=[3, 2, 1, 0])
    expected = scipy_stats.ttest_rel(A, B[::-1]).confidence_interval(0.95)  # matched by seed, not position
    assert paired.method == "paired" and (paired.low, paired.high) == pytest.approx((expected.low, expected.high))
    assert stats.gap_interval(A, B, seeds_a=[0, 1, 2, 3], seeds_b=[0, 1, 2, 4]).method == "Welch"


def test_speed_ratio_interval_is_welch_on_logs_exponentiated():
    fast, slow = [1210.0, 1190.0, 1235.0], [980.0, 1010.0, 1001.0]
    ratio = stats.ratio_interval(fast, slow)
    logs = scipy_stats.ttest_ind(np.log(fast), np.log(slow), equal_var=False).confidence_interval(0.95)
    assert ratio.estimate == pytest.approx(scipy_stats.gmean(fast) / scipy_stats.gmean(slow))
    assert (ratio.low, ratio.high) == pytest.approx((math.exp(logs.low), math.exp(logs.high)))
    assert ratio.verdict == stats.SIGNIFICANT
    assert stats.ratio_interval([1000.0], slow).verdict == stats.ONE_SEED


@pytest.mark.parametrize("a, b, verdict", [
    ([60.0, 61.0, 60.5], [50.0, 51.0, 50.2], "significant at 95%"),
    ([60.0, 52.0, 56.0], [55.0, 59.0, 54.0], "not distinguishable at 95%"),
    ([60.0], [50.0, 51.0, 50.2], "one seed: no verdict"),
])
def test_verdict_words(a, b, verdict):
    assert stats.welch_interval(a, b).verdict == verdict


def test_every_gap_in_the_output_carries_a_verdict(tmp_path, capsys):
    for seed in (0, 1, 2):
        write_run(tmp_path / f"a{seed}", "tiny_resnet", seed, [40.0 + seed, 50.0 + seed])
        write_run(tmp_path / f"b{seed}", "tiny_resnext", seed, [40.5 + seed * 0.8, 58.0 + seed * 0.1])
    write_run(tmp_path / "c0", "tiny_resnet_wide", 0, [45.0, 55.0])
    result = summary.summarize([tmp_path], every_pair=True)
    assert list(result.gaps["verdict"]) == ["not distinguishable at 95%", "significant at 95%",
                                            "one seed: no verdict", "one seed: no verdict",
                                            "one seed: no verdict", "one seed: no verdict"]
    words = (stats.SIGNIFICANT, stats.NOT_DISTINGUISHABLE, stats.ONE_SEED)
    for form in ("markdown", "table"):
        code, out, _ = _summary([tmp_path, "--format", form, "--all", "--every-pair"], capsys)
        takeaways = " ".join(out.split("Takeaways", 1)[1].split())  # undo the terminal's line wrapping
        gap_sentences = takeaways.split("At epoch ")[1:]
        assert code == 0 and len(gap_sentences) == 3 and "95%" in out
        for sentence in gap_sentences:
            assert "points of test accuracy" in sentence and any(word in sentence for word in words)


def test_like_with_like_never_crosses_datasets(tmp_path):
    write_run(tmp_path / "a", "tiny_resnet", 0, [50.0], dataset="cifar10")
    write_run(tmp_path / "b", "tiny_resnext", 0, [20.0], dataset="cifar100")
    write_run(tmp_path / "c", "tiny_resnext", 0, [55.0], dataset="cifar10")
    result = summary.summarize([tmp_path])
    assert sorted(g.label for g in result.groups) == ["tiny_resnet (seed, cifar10)", "tiny_resnext (seed, cifar10)",
                                                      "tiny_resnext (seed, cifar100)"]
    assert list(zip(result.gaps["model"], result.gaps["baseline"])) == [
        ("tiny_resnext (seed, cifar10)", "tiny_resnet (seed, cifar10)")]
    assert not any("cifar100" in line and "points" in line for line in result.takeaways)
    assert any(line.startswith("Not compared: tiny_resnext (seed, cifar100)") and "dataset" in line
               for line in result.takeaways)


# -------------------------------------------------------------------------------------------- recipes
def test_recipes_of_one_arch_and_setup_are_compared_with_the_reference_as_baseline(tmp_path, capsys):
    for seed in (0, 1, 2):
        write_run(tmp_path / f"fast{seed}", "tiny_resnet", seed, [30.0 + seed, 45.0 + seed], recipe="fast")
        write_run(tmp_path / f"seed{seed}", "tiny_resnet", seed, [20.0 + seed, 30.0 + 1.5 * seed])
        write_run(tmp_path / f"next{seed}", "tiny_resnext", seed, [21.0 + seed, 31.0 + seed])
    result = summary.summarize([tmp_path])
    recipes = result.recipe_gaps
    assert list(zip(recipes["model"], recipes["baseline"], recipes["epoch"])) == [
        ("tiny_resnet (fast)", "tiny_resnet (seed)", 1), ("tiny_resnet (fast)", "tiny_resnet (seed)", 2)]
    last = recipes.iloc[-1]
    assert last["method"] == "paired" and last["gap"] == pytest.approx(np.mean([15.0 - 0.5 * s for s in (0, 1, 2)]))
    assert last["verdict"] == stats.SIGNIFICANT
    assert {frozenset(pair) for pair in zip(result.gaps["model"], result.gaps["baseline"])} == {
        frozenset(("tiny_resnext (seed)", "tiny_resnet (seed)"))}  # archs: within one recipe only
    lines = [line for line in result.takeaways if line.startswith("At epoch 2, tiny_resnet (fast)")]
    assert len(lines) == 1 and "against tiny_resnet (seed)" in lines[0] and "significant at 95%" in lines[0]
    assert not any(line.startswith("Not compared") for line in result.takeaways)
    across = [line for line in result.takeaways if line.startswith("Compared only arch by arch, as recipe gaps: ")]
    assert len(across) == 1 and "recipe seed vs fast" in across[0]
    code, out, _ = _summary([tmp_path, "--format", "markdown"], capsys)
    assert code == 0 and "## Recipe gaps in test accuracy, same arch, setup and length" in out


@pytest.mark.parametrize("change", [{"compiled": True}, {"train_images": 1024}, {"world_size": 2}])
def test_recipes_under_different_setups_are_not_compared(tmp_path, change):
    for seed in (0, 1):
        write_run(tmp_path / f"fast{seed}", "tiny_resnet", seed, [30.0 + seed], recipe="fast", **change)
        write_run(tmp_path / f"seed{seed}", "tiny_resnet", seed, [20.0 + seed])
    result = summary.summarize([tmp_path])
    assert result.recipe_gaps.empty and not any("points" in line for line in result.takeaways)
    assert any(line.startswith("Not compared") for line in result.takeaways)


def test_recipes_are_compared_as_users_run_them_in_their_own_precision(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / f"fast{seed}", "tiny_resnet", seed, [30.0 + seed], recipe="fast", precision="bf16",
                  channels_last=True)
        write_run(tmp_path / f"seed{seed}", "tiny_resnet", seed, [20.0 + seed])
    result = summary.summarize([tmp_path])
    assert list(zip(result.recipe_gaps["model"], result.recipe_gaps["baseline"])) == [
        ("tiny_resnet (fast, bf16, channels_last)", "tiny_resnet (seed, fp32, NCHW)")]
    assert result.recipe_gaps.iloc[0]["gap"] == pytest.approx(10.0)


def test_two_non_reference_recipes_take_the_first_as_baseline(tmp_path):
    write_run(tmp_path / "a", "tiny_resnet", 0, [30.0], recipe="fast", overrides={"lr": 0.5})
    write_run(tmp_path / "b", "tiny_resnet", 0, [33.0], recipe="fast", overrides={"lr": 0.4})
    (pair,) = summary.recipe_pairs(summary.summarize([tmp_path]).groups)
    assert [g.label for g in pair] == ["tiny_resnet (fast, lr=0.4)", "tiny_resnet (fast, lr=0.5)"]


def _recipe_gap_rows(result):
    return list(zip(result.recipe_gaps["model"], result.recipe_gaps["baseline"], result.recipe_gaps["epoch"]))


def test_a_constant_lr_recipe_stands_for_each_shorter_length(tmp_path):
    """seed's epoch k is a k-epoch run: one 3-epoch seed run is the baseline of a 1- and a 2-epoch fast run,
    each at its own end only (epoch 1 of the 2-epoch fast run is mid-schedule and never set beside it)."""
    for seed in (0, 1, 2):
        write_run(tmp_path / f"seed{seed}", "tiny_resnet", seed, [20.0 + seed, 30.0 + seed, 35.0 + seed])
        write_run(tmp_path / f"fast1-{seed}", "tiny_resnet", seed, [40.0 + 2 * seed], recipe="fast")
        write_run(tmp_path / f"fast2-{seed}", "tiny_resnet", seed, [10.0, 50.0 + seed], recipe="fast")
    result = summary.summarize([tmp_path])
    assert sorted(_recipe_gap_rows(result)) == [
        ("tiny_resnet (fast, epochs=1)", "tiny_resnet (seed)", 1),
        ("tiny_resnet (fast, epochs=2)", "tiny_resnet (seed)", 2)]
    gaps = result.recipe_gaps.set_index("epoch")
    assert gaps.loc[1, "gap"] == pytest.approx(np.mean([20.0 + s for s in (0, 1, 2)]))
    assert gaps.loc[2, "gap"] == pytest.approx(20.0) and gaps.loc[2, "method"] == "paired"
    ends = result.final_gaps.set_index("epoch")
    assert sorted(ends.index) == [1, 2] and ends.loc[2, "gap"] == pytest.approx(20.0)
    assert any("epoch k of tiny_resnet (seed) is a k-epoch run" in line for line in result.notes)


def test_a_stand_in_must_reach_the_length_and_an_equal_length_one_comes_first(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / f"seed3-{seed}", "tiny_resnet", seed, [20.0, 30.0, 35.0])
        write_run(tmp_path / f"seed1-{seed}", "tiny_resnet", seed, [22.0])
        write_run(tmp_path / f"fast1-{seed}", "tiny_resnet", seed, [40.0 + seed], recipe="fast")
        write_run(tmp_path / f"fast5-{seed}", "tiny_resnet", seed, [10.0, 20.0, 30.0, 40.0, 60.0], recipe="fast")
    result = summary.summarize([tmp_path])
    assert _recipe_gap_rows(result) == [("tiny_resnet (fast, epochs=1)", "tiny_resnet (seed, epochs=1)", 1)]
    assert result.recipe_gaps.iloc[0]["gap"] == pytest.approx(18.5)


def test_a_constant_lr_run_cut_short_still_stands_for_the_epochs_it_finished(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / f"seed{seed}", "tiny_resnet", seed, [20.0, 30.0], planned=5)  # stopped at 2 of 5
        write_run(tmp_path / f"fast{seed}", "tiny_resnet", seed, [10.0, 45.0], recipe="fast")
    result = summary.summarize([tmp_path])
    assert _recipe_gap_rows(result) == [("tiny_resnet (fast)", "tiny_resnet (seed)", 2)]
    assert list(result.final_gaps["epoch"]) == [2]


def test_two_constant_lr_recipes_of_different_lengths_meet_at_every_shared_epoch(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / f"seed{seed}", "tiny_resnet", seed, [20.0, 30.0, 35.0])
        ref = write_run(tmp_path / f"ref{seed}", "tiny_resnet", seed, [21.0, 32.0])
        config = json.loads((ref / CONFIG_NAME).read_text())
        (ref / CONFIG_NAME).write_text(json.dumps({**config, "recipe_name": "reference"}))
    result = summary.summarize([tmp_path], epochs=[1, 2, 3])
    assert _recipe_gap_rows(result) == [("tiny_resnet (reference)", "tiny_resnet (seed)", 1),
                                        ("tiny_resnet (reference)", "tiny_resnet (seed)", 2)]
    assert list(result.final_gaps["epoch"]) == [2]


def test_epochs_are_runs_only_where_nothing_depends_on_the_length():
    assert RECIPES["seed"].epochs_are_runs
    assert not RECIPES["fast"].epochs_are_runs  # one-cycle over the run
    assert not replace(RECIPES["fast"], schedule="constant", warmup_fraction=0.0).epochs_are_runs  # sized by it
    assert not replace(RECIPES["seed"], warmup_fraction=0.1).epochs_are_runs


# --------------------------------------------------------------------------------------------- speed
def test_speed_is_the_median_of_epochs_two_on(tmp_path):
    write_run(tmp_path / "a", "tiny_resnet", 0, [1.0, 2.0, 3.0, 4.0, 5.0], img_per_s=[100, 200, 210, 190, 900])
    write_run(tmp_path / "b", "tiny_resnet", 1, [1.0, 2.0, 3.0], img_per_s=[50, 300, 320], planned=5)
    write_run(tmp_path / "one", "tiny_resnext", 0, [1.0], img_per_s=[70])
    models = summary.summarize([tmp_path]).models.set_index("arch")
    assert models.loc["tiny_resnet", "median_img_per_s"] == pytest.approx(np.mean([205.0, 310.0]))
    assert models.loc["tiny_resnet", "median_img_per_s_std"] == pytest.approx(np.std([205.0, 310.0], ddof=1))
    assert models.loc["tiny_resnext", "median_img_per_s"] == 70
    assert models.loc["tiny_resnext", "speed_with_warm_up"] == 1


def test_speed_ratio_takeaway_has_an_interval_and_per_flop(mixed):
    result = summary.summarize([mixed])
    (ratio,) = result.speeds.itertuples()
    assert ratio.ratio == pytest.approx(805.0 / scipy_stats.gmean([1000.0, 1010.0, 1020.0]))
    assert ratio.low < ratio.ratio < ratio.high and ratio.verdict == stats.SIGNIFICANT
    line = next(line for line in result.takeaways if "trains at" in line)
    assert "median img/s after warm-up" in line and "95% interval" in line and "per FLOP" in line


# ------------------------------------------------------------------------------------ optional columns
def test_optional_accuracy_columns_are_aggregated_when_present(tmp_path, capsys):
    for seed in (0, 1):
        write_run(tmp_path / f"s{seed}", "tiny_resnet", seed, [40.0, 50.0],
                  extra={"val_acc": [41.0 + seed, 51.0 + seed], "test_acc_ema": [42.0, 52.0 + 2 * seed],
                         "train_objective": [2.2, 1.2]})
    table = _csv([tmp_path], capsys)
    last = table[table["epoch"] == 2].iloc[0]
    assert last["val_acc"] == pytest.approx(51.5) and last["test_acc_ema_std"] == pytest.approx(math.sqrt(2))
    assert np.isfinite(last["val_acc_ci95"]) and last["train_objective"] == pytest.approx(1.2)
    assert "test_acc_tta" not in table
    code, out, _ = _summary([tmp_path, "--format", "markdown"], capsys)
    assert code == 0 and "## Other accuracies" in out and "| 53.00 ± 1.41 |" in out and "TTA" not in out


def test_minimal_csv_without_run_columns_still_summarizes(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    pd.DataFrame({"epoch": [1, 2], "test_acc": [40.0, 50.0], "img_per_s": [10.0, 20.0], "arch": "a",
                  "seed": 0}).to_csv(run_dir / CSV_NAME, index=False)
    result = summary.summarize([tmp_path])
    assert result.groups[0].label == "a (?)" and result.models.iloc[0]["median_img_per_s"] == 20.0
    assert any("could not be resolved" in line for line in result.notes)


def test_runs_of_different_lengths_and_unfinished(tmp_path):
    write_run(tmp_path / "long", "tiny_resnet", 0, [50.0, 60.0, 70.0, 71.0, 72.0, 73.0])
    write_run(tmp_path / "short", "tiny_resnext", 0, [40.0, 45.0], planned=10)
    result = summary.summarize([tmp_path])
    results = result.results
    assert sorted(results[results["arch"] == "tiny_resnet"]["epoch"]) == [1, 5, 6]
    assert sorted(results[results["arch"] == "tiny_resnext"]["epoch"]) == [1, 2]
    assert "epochs=6" in result.groups[0].label and "epochs=10" in result.groups[1].label  # recipes differ
    assert result.gaps.empty
    assert result.models.set_index("arch").loc["tiny_resnext", "incomplete"] == 1
    assert any("not finished" in line for line in result.takeaways)


# ---------------------------------------------------------------------------------------------- views
def test_table_fits_80_columns_and_keeps_numbers_whole(mixed, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = _summary([mixed, "--all"], capsys)
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 80
    result = summary.summarize([mixed])
    row = result.results.set_index(["model", "epoch"]).loc[("tiny_resnet (seed, fp32)", 3)]
    assert f"{row['test_acc']:.2f} ± {row['test_acc_std']:.2f}" in out
    gap = result.gaps.iloc[-1]
    assert f"[{gap['low']:+.2f}, {gap['high']:+.2f}]" in out
    assert "significant" in out and "95%" in out and "median img/s" in out.lower().replace("\n", " ")


def test_all_optional_accuracies_still_fit_80_columns(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    for seed in (0, 1):
        write_run(tmp_path / f"s{seed}", "tiny_resnext", seed, [40.0], extra={
            "val_acc": [41.0], "test_acc_ema": [42.0], "test_acc_tta": [43.0], "val_loss": [1.0]})
    code, out, _ = _summary([tmp_path, "--all"], capsys)
    assert code == 0 and max(len(line) for line in out.splitlines()) <= 80
    assert "Other accuracies" in out and "43.00 ± 0.00" in out


def test_narrow_terminal_wraps_but_never_cuts_numbers(mixed, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "50")
    code, out, _ = _summary([mixed], capsys)
    row = summary.summarize([mixed]).results.iloc[-1]
    assert code == 0 and f"{row['test_acc']:.2f}" in out and "…" not in out


def test_markdown_parses_into_tables(mixed, capsys, tmp_path):
    code, out, _ = _summary([mixed, "--format", "markdown", "--output", tmp_path / "s.md"], capsys)
    assert code == 0 and (tmp_path / "s.md").read_text() == out
    results = [line for line in out.split("## Results")[1].split("## Models")[0].splitlines() if line.startswith("|")]
    header = [c.strip() for c in results[0].strip("|").split("|")]
    assert header[:5] == ["Setting", "Epoch", "Seeds", "Test acc % ± std", "± 95%"]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in results[2:]]
    assert all(len(cells) == len(header) for cells in body)
    assert {int(cells[1]) for cells in body} == {1, 3}  # default: epochs 1, 5 (absent) and the last
    assert "## Test accuracy gaps, like with like" in out and "| sig. |" in out
    assert "sig./n.s.: the gap's 95% interval excludes/contains 0" in out


@pytest.mark.parametrize("epochs", [[1.0, 2.0, 3.0], [1.0]])
def test_plot_is_a_png(tmp_path, capsys, epochs):
    for seed in (0, 1):
        write_run(tmp_path / f"a{seed}", "tiny_resnet", seed, [e * 10 + seed for e in epochs])
        write_run(tmp_path / f"b{seed}", "tiny_resnext", seed, [e * 12 + seed for e in epochs])
    code, out, err = _summary([tmp_path, "--plot", tmp_path / "plot.png"], capsys)
    assert code == 0 and f"plot written to {tmp_path / 'plot.png'}" in out, err
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    assert matplotlib.image.imread(tmp_path / "plot.png").shape[0] > 300


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("content, fragment", [
    (None, "no epochs.csv"),
    ("", "cannot read"),
    ("epoch,loss\n1,2\n", "missing columns"),
    ("\x00\x01garbage\n,,\n", "missing columns"),
    ("epoch,test_acc,img_per_s,arch,seed\n1,abc,1,a,0\n", "non-numeric"),
])
def test_empty_or_malformed_input_exits_2(tmp_path, capsys, content, fragment):
    if content is not None:
        (tmp_path / CSV_NAME).write_text(content)
    code, _, err = _summary([tmp_path], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err


def test_missing_path_exits_2(tmp_path, capsys):
    code, _, err = _summary([tmp_path / "nope"], capsys)
    assert code == 2 and "does not exist" in err


def test_epochs_nobody_reached_exit_2(tmp_path, capsys):
    write_run(tmp_path / "r", "tiny_resnet", 0, [50.0])
    code, _, err = _summary([tmp_path, "--epochs", "7"], capsys)
    assert code == 2 and "none of the runs reached" in err


def test_plot_without_matplotlib_is_one_clear_line(tmp_path, capsys, monkeypatch):
    import builtins
    write_run(tmp_path / "r", "tiny_resnet", 0, [50.0])
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, _, err = _summary([tmp_path, "--plot", tmp_path / "p.png"], capsys)
    assert code == 2 and "cardinal[plot]" in err


# ------------------------------------------------------------------------------- the study (real runs)
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A real study: two tiny archs x two seeds, 2 epochs each, on synthetic data."""
    root = tmp_path_factory.mktemp("study")
    done = cli("cardinal.study", ["--archs", *ARCHS, "--seeds", "0", "1", "--epochs", "2", "--dataset",
                                  "synthetic", "--output-dir", str(root), "--launcher", sys.executable,
                                  "--summary-format", "markdown", "--report-epochs", "1", "2", "--",
                                  "--synthetic-train", "128", "--synthetic-test", "64", "--batch-size", "64",
                                  "--no-progress", "--no-export"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


def _study_csvs(study, arch):
    return [pd.read_csv(study / f"{arch}-seed-synthetic-seed{seed}" / CSV_NAME) for seed in (0, 1)]


@pytest.mark.slow
def test_study_leaves_one_run_per_arch_and_seed_and_a_summary(study):
    assert sorted(p.name for p in study.iterdir() if p.is_dir()) == sorted(
        f"{arch}-seed-synthetic-seed{seed}" for arch in ARCHS for seed in (0, 1))
    text = (study / "summary.md").read_text()
    assert "## Results" in text and "## Takeaways" in text and all(arch in text for arch in ARCHS)
    assert "| tiny_resnext vs tiny_resnet |" in text and "95%" in text
    assert json.loads((study / "study.json").read_text())["archs"] == list(ARCHS)


@pytest.mark.slow
def test_study_skips_finished_runs(study):
    done = cli("cardinal.study", ["--archs", *ARCHS, "--seeds", "0", "1", "--epochs", "2", "--dataset",
                                  "synthetic", "--output-dir", str(study), "--launcher", sys.executable,
                                  "--no-summary"])
    assert done.returncode == 0 and done.stdout.count("skipped") == 4


@pytest.mark.slow
def test_summary_of_real_runs_matches_their_records(study, capsys):
    table = _csv([study, "--epochs", "1", "2"], capsys)
    assert len(table) == len(ARCHS) * 2 and set(table["model"]) == {f"{arch} (seed)" for arch in ARCHS}
    for arch in ARCHS:
        runs = _study_csvs(study, arch)
        for epoch in (1, 2):
            row = table[(table["arch"] == arch) & (table["epoch"] == epoch)].iloc[0]
            for column in ("train_loss", "test_acc", "img_per_s", "it_per_s", "epoch_time_s"):
                values = [r.loc[r["epoch"] == epoch, column].iloc[0] for r in runs]
                assert row[column] == pytest.approx(np.mean(values), rel=1e-9)
                assert row[f"{column}_std"] == pytest.approx(np.std(values, ddof=1), rel=1e-9, abs=1e-12)
            assert row["runs"] == 2 and row["params"] == runs[0]["params"].iloc[0]
        medians = [r.loc[r["epoch"] >= 2, "img_per_s"].median() for r in runs]
        assert table[table["arch"] == arch]["median_img_per_s"].iloc[0] == pytest.approx(np.mean(medians))


def test_study_bad_launcher_is_one_line(tmp_path, capsys):
    from cardinal import study as study_module
    with pytest.raises(SystemExit) as exit_info:
        run(study_module.main, ["--archs", "tiny_resnet", "--output-dir", str(tmp_path), "--dry-run",
                                "--launcher", "accelerate launch 'unclosed"])
    assert exit_info.value.code == 2 and "--launcher" in capsys.readouterr().err
