"""The curves and ablation of LT-Net at test time (ltnet_keras.study.refine_curves): the named
settings, resuming from cases.csv, the summary, and one real case end to end."""
import csv

import pytest

import ltnet_keras  # noqa: F401  (before TensorFlow)
from ltnet_keras.inference.refine import RefineSettings
from ltnet_keras.inference.refine_cycle import CycleWeights
from ltnet_keras.study import refine_curves as curves


def test_curve_settings_scale_every_level_and_start_from_the_identity_at_zero():
    named = curves.curve_settings(["network", "zero"], ["plain", "ltnet"], (0, 0.1, 1, 2))
    assert len(named) == 2 * 2 * 4
    assert named["network/plain/x0"] is None                        # G_F's own field
    identity = named["zero/ltnet/x0"]
    assert identity.levels == ((8, 0),) and identity.start == "zero"
    assert identity.objective == "ltnet"
    assert named["network/plain/x1"] == RefineSettings()
    assert named["zero/plain/x0.1"].levels == ((8, 4), (4, 3), (2, 2))   # 40, 30, 15 x 0.1
    assert named["network/ltnet/x2"].levels == ((8, 80), (4, 60), (2, 30))


def test_ablation_switches_each_weighted_term_off_in_turn():
    base = RefineSettings(objective="ltnet", cycle=CycleWeights(
        backward_similarity=1.0, image_cycle=3.0, transformation=1.0, anatomy_cycle=0.0,
        anatomy_difference=2.0))
    named = curves.ablation_settings(base)
    assert list(named) == ["all terms", "without backward_similarity", "without image_cycle",
                           "without transformation", "without anatomy_difference"]
    assert named["without image_cycle"].cycle == CycleWeights(
        backward_similarity=1.0, image_cycle=0.0, transformation=1.0, anatomy_cycle=0.0,
        anatomy_difference=2.0)
    assert named["all terms"] is base


def _row(setting, subject, dice, refine_s, trip=""):
    start, objective, scale = setting.split("/")
    return {"dataset": "lpba40", "run": "ltnet", "setting": setting, "start": start,
            "objective": objective, "scale": scale[1:], "subject": subject, "dice": dice,
            "dice_label": dice - 1.0, "refine_s": refine_s, "segment_s": refine_s + 1.0,
            "inverse_consistency_mm": trip, "folding_percent": 0.1}


def test_summary_groups_cases_and_keeps_the_inverse_consistency_of_ltnet_only(tmp_path):
    for row in (_row("network/plain/x1", "S31", 75.0, 2.0), _row("network/plain/x1", "S32",
                                                                  73.0, 4.0),
                _row("network/ltnet/x1", "S31", 76.0, 6.0, 0.5)):
        curves._append(tmp_path / "cases.csv", row)
    assert curves._done(tmp_path / "cases.csv") == {("ltnet", "network/plain/x1", "S31"),
                                                     ("ltnet", "network/plain/x1", "S32"),
                                                     ("ltnet", "network/ltnet/x1", "S31")}
    plain, ltnet = curves.summarise(curves.read_cases(tmp_path))
    assert (plain["n"], plain["dice"], plain["dice_std"], plain["refine_s"]) == (2, 74.0, 1.0,
                                                                                 3.0)
    assert plain["inverse_consistency_mm"] != plain["inverse_consistency_mm"]   # NaN
    assert ltnet["inverse_consistency_mm"] == pytest.approx(0.5)
    markdown = curves.summary_markdown([plain, ltnet], "t")
    assert "| lpba40 | ltnet | network/plain/x1 | 2 | 74.00 (1.00) |" in markdown
    curves.plot_curves([plain, ltnet], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_run_cases_measures_each_case_once_and_resumes(tmp_path, lpba40_root):
    from pathlib import Path
    run = Path(__file__).resolve().parents[2] / "results" / "recipe" / "ltnet"
    named = {"zero/plain/x0": RefineSettings(levels=((8, 0),), start="zero"),
             "network/ltnet/x0.05": RefineSettings(levels=((8, 2), (4, 2)),
                                                   objective="ltnet")}
    curves.run_cases(run, named, tmp_path, "ltnet", subjects=["S31"], log=lambda _: None)
    rows = curves.read_cases(tmp_path)
    assert [(r["setting"], r["subject"]) for r in rows] == [("zero/plain/x0", "S31"),
                                                           ("network/ltnet/x0.05", "S31")]
    identity, ltnet = rows
    assert float(identity["refine_s"]) < 0.5 and identity["inverse_consistency_mm"] == "nan"
    # Two steps from G_F and G_B beat no registration at all, and report their round trip.
    assert float(ltnet["dice"]) > float(identity["dice"]) + 3.0
    assert 0.0 < float(ltnet["inverse_consistency_mm"]) < 5.0
    curves.run_cases(run, named, tmp_path, "ltnet", subjects=["S31"], log=lambda _: None)
    assert len(curves.read_cases(tmp_path)) == 2                  # resumed: nothing re-run
