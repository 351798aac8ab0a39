"""QC without the truth: local NCC, the signals on cases of known quality, the calibrated model."""
import json

import numpy as np
import pytest

from ltnet_keras.data.errors import VolumeError
from ltnet_keras.data.labels import LabelTable
from ltnet_keras.inference.qc import (QCModel, atlas_disagreement, choose_threshold, local_ncc,
                                      qc_signals)


def textured(shape=(40, 40, 40), seed=0):
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(seed)
    return gaussian_filter(rng.normal(size=shape), 2).astype(np.float32)


def test_local_ncc_of_an_image_with_itself_its_negative_and_a_flat_one():
    image = textured()
    assert np.allclose(local_ncc(image, image)[5:-5, 5:-5, 5:-5], 1.0, atol=1e-6)
    assert np.allclose(local_ncc(image, -image)[5:-5, 5:-5, 5:-5], -1.0, atol=1e-6)
    assert np.all(local_ncc(image, np.ones_like(image)) == 0.0)


def test_signals_rank_cases_of_known_quality():
    """The same atlas against targets ever further from it (more noise, then a shift): the
    NCC inside the labels falls in that order."""
    atlas = textured(seed=1)
    labels = np.zeros(atlas.shape, np.int16)
    labels[8:20, 8:32, 8:32], labels[20:32, 8:32, 8:32] = 1, 2
    table = LabelTable([1, 2], ["L_x", "R_x"], ["x", "x"])
    identity = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in atlas.shape],
                                    indexing="ij"), -1)
    rng = np.random.default_rng(2)
    targets = [atlas + rng.normal(0, s, atlas.shape).astype(np.float32) * atlas.std()
               for s in (0.0, 0.5, 1.5)] + [np.roll(atlas, 8, axis=0)]
    means = [qc_signals(atlas, labels, t, identity, table, 0.1)["ncc_mean"] for t in targets]
    assert means[0] > 0.99
    assert means == sorted(means, reverse=True), means
    signals = qc_signals(atlas, labels, targets[1], identity, table, 0.1, alignment_ncc=0.7)
    assert set(signals) == {"ncc_mean", "ncc_x", "ncc_low", "sharpness_log_ratio",
                           "sharpness_deviation", "empty_fraction", "folding_percent",
                           "alignment_ncc"}
    assert signals["empty_fraction"] == 0.0
    cut = targets[0] - targets[0].min() + 0.5   # a scan: positive inside, 0 outside its view
    cut[20:] = 0     # a partial field of view: half of the labelled voxels lie where it is empty
    assert qc_signals(atlas, labels, cut, identity, table, 0.1)["empty_fraction"] == \
        pytest.approx(0.5, abs=0.05)


def test_atlas_disagreement_counts_labelled_voxels_where_atlases_differ():
    a = np.array([0, 1, 1, 2, 0])
    b = np.array([0, 1, 2, 2, 3])
    assert atlas_disagreement([a, b]) == pytest.approx(2 / 4)
    assert atlas_disagreement([a, a]) == 0.0


def rows_of_known_quality():
    rng = np.random.default_rng(4)
    rows = []
    for i in range(40):
        ncc = rng.uniform(0.2, 0.9)
        kind = "clean" if i < 10 else "noise"
        rows.append({"degradation": kind, "ncc_mean": ncc, "ncc_low": ncc - 0.1,
                     "folding_percent": 0.2, "ncc_x": ncc, "dice": 0.4 + 0.5 * ncc,
                     "dice_x": 0.3 + 0.6 * ncc})
    return rows


def test_model_recovers_a_known_relation_and_round_trips(tmp_path):
    rows = rows_of_known_quality()
    model = QCModel.fit(rows, features=("ncc_mean", "folding_percent", "alignment_ncc"))
    assert model.features == ["ncc_mean", "folding_percent"]   # no row has alignment_ncc
    predicted = model.predict({"ncc_mean": 0.6, "folding_percent": 0.2, "ncc_x": 0.5})
    assert predicted["predicted_dice"] == pytest.approx(0.7, abs=1e-6)
    assert predicted["predicted_dice_x"] == pytest.approx(0.6, abs=1e-6)
    assert model.predict({"ncc_mean": 5.0, "folding_percent": 0})["predicted_dice"] == 1.0
    with pytest.raises(ValueError, match="folding_percent"):
        model.predict({"ncc_mean": 0.5})
    again = QCModel.load(model.save(tmp_path / "qc_model.json"))
    assert again.to_dict() == json.loads(json.dumps(model.to_dict()))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(VolumeError, match="not a QC model"):
        QCModel.load(tmp_path / "bad.json")


def test_threshold_flags_at_most_a_fifth_of_clean_cases():
    rows = rows_of_known_quality()
    model = QCModel.fit(rows)
    threshold = choose_threshold(model, rows)
    clean = [model.predict(r)["predicted_dice"] for r in rows if r["degradation"] == "clean"]
    assert sum(p < threshold for p in clean) <= 2
    assert model.threshold == threshold and model.flag(threshold - 0.01) == "check"
    assert model.flag(threshold) == "ok"


def test_sharpness_ratio_sees_blur_and_noise_that_ncc_may_miss():
    from scipy.ndimage import gaussian_filter

    from ltnet_keras.inference.qc import sharpness_log_ratio
    atlas = textured(seed=5)
    inside = np.ones(atlas.shape, bool)
    assert sharpness_log_ratio(atlas, atlas, inside) == pytest.approx(0.0, abs=1e-9)
    blurred = gaussian_filter(atlas, 1.5)
    noisy = atlas + np.random.default_rng(1).normal(0, atlas.std(), atlas.shape)
    assert sharpness_log_ratio(blurred, atlas, inside) < -0.3
    assert sharpness_log_ratio(noisy, atlas, inside) > 0.3
    assert sharpness_log_ratio(atlas, atlas, np.zeros_like(inside)) == 0.0
