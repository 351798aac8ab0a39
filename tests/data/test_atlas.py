import nibabel as nib
import numpy as np
import pytest

from ltnet_keras.data.atlas import select_atlas


def _pool(seed=0, shape=(12, 10, 8)):
    rng = np.random.default_rng(seed)
    a, b, c = (rng.random(shape) for _ in range(3))
    return {"a": a, "b": b, "c": c, "mean_of_others": (a + b + c) / 3}


@pytest.mark.parametrize("measure", ["ncc", "mse"])
def test_picks_the_image_equal_to_the_average(measure):
    # The average of a, b, c and (a + b + c) / 3 is (a + b + c) / 3 itself.
    choice = select_atlas(_pool(), measure=measure, normalise=False)
    assert choice.subject == "mean_of_others"
    assert choice.measure == measure
    assert choice.ranking[0] == "mean_of_others" and set(choice.ranking) == {"a", "b", "c",
                                                                             "mean_of_others"}
    best = choice.scores["mean_of_others"]
    assert best == pytest.approx(1.0 if measure == "ncc" else 0.0, abs=1e-12)
    values = list(choice.scores.values())
    assert values == sorted(values, reverse=True)


def test_ncc_ignores_scale_but_mse_does_not():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 8, 8, 8))
    pool = {"a": a, "b": b, "scaled_sum": 3 * (a + b)}  # average = 4/3 (a + b)
    assert select_atlas(pool, "ncc", normalise=False).subject == "scaled_sum"
    assert select_atlas(pool, "mse", normalise=False).subject != "scaled_sum"


def test_paths_normalisation_and_stride(tmp_path):
    pool = _pool(2, shape=(16, 16, 16))
    paths = []
    for number, (name, array) in enumerate(pool.items()):
        path = tmp_path / f"{name}.nii.gz"
        # Different intensity scales per file: normalisation must undo them.
        nib.save(nib.Nifti1Image((array * (number + 1) * 100).astype(np.float32), np.eye(4)),
                 str(path))
        paths.append(path)
    for factor in (1, 2):
        choice = select_atlas(paths, factor=factor)
        assert choice.subject == "mean_of_others"


def test_parameter_validation():
    with pytest.raises(ValueError, match="ncc, mse"):
        select_atlas(_pool(), measure="mae")
    with pytest.raises(ValueError, match="factor"):
        select_atlas(_pool(), factor=0)
    with pytest.raises(ValueError, match="at least one"):
        select_atlas({})
    pool = _pool()
    pool["odd"] = np.zeros((3, 3, 3))
    with pytest.raises(ValueError, match="odd.*shape"):
        select_atlas(pool, normalise=False)


@pytest.mark.slow
def test_select_atlas_on_lpba40_training_pool(lpba40_root):
    paths = [lpba40_root / "images" / f"S{n}.nii.gz" for n in range(11, 16)]
    choice = select_atlas(paths, factor=4)
    print(f"\natlas among S11-S15 (ncc, factor 4): {choice.subject} {choice.scores}")
    assert choice.subject in {f"S{n}" for n in range(11, 16)}
    assert all(0.5 < v <= 1.0 for v in choice.scores.values())
