"""Choosing the QC model's signals and judging it with each subject left out."""
import numpy as np

from ltnet_keras.study.qc_calibration import leave_one_subject_out, select_features


def rows(seed=0):
    """Four subjects, each a clean scan and 11 degraded ones; true Dice follows ncc_mean and
    empty_fraction; the other signals are noise; subjects differ a little in their Dice."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(4):
        for i in range(12):
            ncc, empty = rng.uniform(0.5, 0.9), rng.uniform(0, 0.3) * (i % 3 == 1)
            if i == 0:   # the clean scan: the best match
                ncc = rng.uniform(0.88, 0.9)
            dice = 0.3 + 0.6 * ncc - 0.8 * empty + 0.01 * s + rng.normal(0, 0.005)
            out.append({"subject": f"s{s}", "degradation": "clean" if i == 0 else "noise",
                        "ncc_mean": ncc, "empty_fraction": empty,
                        "ncc_low": rng.uniform(0.3, 0.8), "folding_percent": rng.uniform(0, 1),
                        "sharpness_log_ratio": rng.normal(0, 0.2), "dice": dice})
    return out


def test_select_features_finds_the_signals_that_carry_the_dice():
    assert set(select_features(rows())) == {"ncc_mean", "empty_fraction"}


def test_leave_one_subject_out_ranks_and_flags_with_signals_chosen_without_the_subject():
    judged = leave_one_subject_out(rows())
    summary = judged["summary"]
    assert summary["spearman_loso"] > 0.95
    assert summary["clean_cases"] == 4 and summary["clean_flagged"] <= 1
    assert summary["bad_flagged_fraction"] >= 0.8
    assert len(judged["predicted"]) == 48
