"""Segmentation: the label warp of Eq. (2), the image warp, and Segmenter / `ltnet segment`."""
from pathlib import Path

import ltnet_keras  # noqa: F401  (must precede TensorFlow)

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from ltnet_keras import cli
from ltnet_keras.inference.segment import warp_image, warp_label_map


def identity(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape],
                                indexing="ij"), -1)


def shifted_reference(array, shift):
    """``array[t + shift]`` with indices clamped to the volume (border repeated)."""
    index = [np.clip(np.arange(n) + s, 0, n - 1) for n, s in zip(array.shape, shift)]
    return array[np.ix_(*index)]


@pytest.fixture(scope="module")
def random_labels():
    rng = np.random.default_rng(0)
    return rng.choice(np.array([0, 3, 7, 21, 182], dtype=np.int32), size=(9, 10, 11))


@pytest.mark.parametrize("method", ["nearest", "linear"])
@pytest.mark.parametrize("shift", [(0, 0, 0), (1, 0, 0), (0, -2, 1), (3, 1, -1)])
def test_integer_shift_is_exact(random_labels, method, shift):
    positions = identity(random_labels.shape) + np.array(shift, np.float32)
    warped = warp_label_map(random_labels, positions, method)
    assert warped.shape == random_labels.shape
    assert warped.dtype == random_labels.dtype
    np.testing.assert_array_equal(warped, shifted_reference(random_labels, shift))


@pytest.mark.parametrize("method", ["nearest", "linear"])
def test_output_shape_follows_the_positions(random_labels, method):
    positions = identity((4, 5, 6)) + 2.0
    warped = warp_label_map(random_labels, positions, method)
    assert warped.shape == (4, 5, 6)
    np.testing.assert_array_equal(warped, random_labels[2:6, 2:7, 2:8])


def test_linear_half_voxel_shift_picks_a_corner_label(random_labels):
    positions = identity(random_labels.shape) + np.array([0.5, 0.0, 0.0], np.float32)
    warped = warp_label_map(random_labels, positions, "linear")
    here = random_labels
    ahead = shifted_reference(random_labels, (1, 0, 0))
    assert np.all((warped == here) | (warped == ahead))
    # where both corners agree there is no choice to make
    same = here == ahead
    np.testing.assert_array_equal(warped[same], here[same])


def test_linear_is_a_weighted_vote_not_nearest():
    labels = np.full((2, 2, 2), 5, dtype=np.int32)
    labels[0, 0, 0] = 9
    position = np.array([[[[0.3, 0.3, 0.3]]]], np.float32)  # (1, 1, 1, 3)
    # nearest corner is (0, 0, 0) = 9 (weight 0.343); the other seven corners, all 5, weigh 0.657
    assert warp_label_map(labels, position, "nearest").item() == 9
    assert warp_label_map(labels, position, "linear").item() == 5
    # close enough to the corner, 9 outweighs the rest
    position = np.array([[[[0.05, 0.05, 0.05]]]], np.float32)
    assert warp_label_map(labels, position, "linear").item() == 9


@pytest.mark.parametrize("method", ["nearest", "linear"])
def test_only_labels_of_the_input_appear(random_labels, method):
    rng = np.random.default_rng(1)
    positions = rng.uniform(-3, 14, size=(12, 12, 12, 3)).astype(np.float32)
    warped = warp_label_map(random_labels, positions, method)
    assert set(np.unique(warped)) <= set(np.unique(random_labels))


def test_invalid_method_raises(random_labels):
    with pytest.raises(ValueError, match="cubic.*linear, nearest"):
        warp_label_map(random_labels, identity(random_labels.shape), "cubic")


def test_warp_image_known_shift():
    image = np.random.default_rng(2).random((8, 9, 10)).astype(np.float32)
    positions = identity(image.shape) + np.array([0, 2, 0], np.float32)
    np.testing.assert_allclose(warp_image(image, positions), shifted_reference(image, (0, 2, 0)),
                               atol=1e-6)
    half = warp_image(image, identity(image.shape) + np.array([0.5, 0, 0], np.float32))
    np.testing.assert_allclose(half[:-1], 0.5 * (image[:-1] + image[1:]), atol=1e-6)
    assert warp_image(image, identity(image.shape)).dtype == np.float32


# ------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, lpba40_root):
    """10 steps of `voxelmorph` at 32x48x32, S11 -> S12 (shared with test_training)."""
    from test_training import base_run
    return base_run(tmp_path_factory, lpba40_root)


@pytest.mark.slow
def test_segment_cli_end_to_end(trained_run, lpba40_root, tmp_path, capsys):
    from ltnet_keras.data.labels import LabelTable
    image = lpba40_root / "images" / "S12.nii.gz"
    out = tmp_path / "out"
    code = cli.main(["segment", "--run", str(trained_run), "--image", str(image), "--out",
                     str(out), "--save-field", "--save-warped-atlas"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    source = nib.load(str(image))
    result = nib.load(str(out / "S12.nii.gz"))
    assert result.shape == source.shape == (160, 192, 160)
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-5)
    labels = np.asarray(result.dataobj)
    assert np.issubdtype(labels.dtype, np.integer)
    table = LabelTable.from_tsv(lpba40_root / "labels.tsv")
    present = set(np.unique(labels).tolist())
    assert present <= set(table.ids.tolist()) | {0}
    assert len(present) > 40  # the atlas' structures survive the warp
    # a barely trained G_F is close to the identity: the result overlaps S12's own labels
    from ltnet_keras.evaluation import evaluate_pair
    truth = np.asarray(nib.load(str(lpba40_root / "labels" / "S12.nii.gz")).dataobj)
    dice = evaluate_pair(labels, truth, table).mean_structure
    # no registration at all gives 0.555 for this pair (the data are affinely pre-aligned)
    assert dice > 0.5, f"S11 -> S12 mean structure Dice after 10 steps: {dice:.4f}"

    field = nib.load(str(out / "forward_field" / "S12.nii.gz"))
    assert field.shape == (160, 192, 160, 3)
    assert np.all(np.isfinite(np.asarray(field.dataobj)))
    warped = nib.load(str(out / "warped_atlas" / "S12.nii.gz"))
    assert warped.shape == (160, 192, 160)
    assert "S12.nii.gz" in captured.out + captured.err


@pytest.mark.slow
def test_segmenter_nearest_and_linear_agree_mostly(trained_run, lpba40_root):
    from ltnet_keras.inference.segment import Segmenter
    image = lpba40_root / "images" / "S12.nii.gz"
    linear = Segmenter(trained_run, label_interp="linear").segment(image)
    nearest = Segmenter(trained_run, label_interp="nearest").segment(image)
    assert linear.labels.shape == nearest.labels.shape == (160, 192, 160)
    assert linear.forward_field.shape == (160, 192, 160, 3)
    agreement = float(np.mean(linear.labels == nearest.labels))
    assert 0.9 < agreement, agreement


def test_kept_scans_are_taken_once_and_within_their_bytes():
    from ltnet_keras.inference.segment import KeptScans
    kept = KeptScans(max_bytes=100)
    kept.keep("a.nii.gz", "A", 60)
    kept.keep("b.nii.gz", "B", 60)              # beyond the bytes: not kept
    kept.keep(Path("a.nii.gz"), "A again", 10)   # the same path: the first stays
    assert kept.used == 60
    assert kept.take("b.nii.gz") is None
    assert kept.take(Path("a.nii.gz")) == "A" and kept.used == 0
    assert kept.take("a.nii.gz") is None
    kept.keep("b.nii.gz", "B", 60)
    assert kept.take("b.nii.gz") == "B"


@pytest.mark.slow
def test_a_checked_scan_is_segmented_without_reading_it_again(trained_run, lpba40_root,
                                                                monkeypatch):
    from ltnet_keras.inference.segment import Segmenter
    image = lpba40_root / "images" / "S12.nii.gz"
    segmenter = Segmenter(trained_run)
    reference = segmenter.segment(image).labels
    reads = []
    original = segmenter.brain_finder.read
    monkeypatch.setattr(segmenter.brain_finder, "read",
                        lambda path: reads.append(path) or original(path))
    segmenter.prepare(image, keep=True)
    np.testing.assert_array_equal(segmenter.segment(image).labels, reference)
    assert len(reads) == 1 and segmenter.checked_scans.used == 0
    segmenter.segment(image)                    # not checked: read from the file
    assert len(reads) == 2
    segmenter.prepare(image)                    # a check alone (a study's cases) keeps nothing
    assert segmenter.checked_scans.used == 0


@pytest.mark.parametrize("missing", ["forward_generator", "atlas.json", "config.yaml"])
def test_segment_missing_run_file_is_exit_code_2(lpba40_root, tmp_path, capsys, missing):
    from ltnet_keras.training import FORWARD_WEIGHTS
    missing = FORWARD_WEIGHTS if missing == "forward_generator" else missing
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "atlas.json", FORWARD_WEIGHTS):
        if name != missing:
            (run / name).write_text("")  # only existence is checked before the error
    code = cli.main(["segment", "--run", str(run), "--image",
                     str(lpba40_root / "images" / "S12.nii.gz"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert str(run / missing) in err, err
    assert "ltnet segment: error" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_segment_missing_image_is_exit_code_2(trained_run, tmp_path, capsys):
    image = tmp_path / "nope.nii.gz"
    code = cli.main(["segment", "--run", str(trained_run), "--image", str(image), "--out",
                     str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert str(image) in err


@pytest.mark.parametrize("original_shape, crop_start, crop_shape, factor", [
    ((20, 24, 18), (2, -3, 1), (16, 32, 16), 4),   # crop partly outside the volume (padding)
    ((16, 16, 16), (0, 0, 0), (16, 16, 16), 2),
    ((12, 10, 14), (1, 1, 1), (8, 8, 8), 1),
])
def test_tf_field_upsampling_matches_gridspec(original_shape, crop_start, crop_shape, factor):
    """segment.field_to_grid (TF, in the XLA graph) is GridSpec.field_to_original (numpy)."""
    from ltnet_keras.data.preprocess import GridSpec
    from ltnet_keras.inference.segment import field_to_grid
    grid = GridSpec(original_shape, crop_start, crop_shape, factor)
    field = np.random.default_rng(1).normal(size=grid.network_shape + (3,)).astype(np.float32)
    expected = grid.field_to_original(field)
    got = field_to_grid(tf.constant(field), original_shape, tf.constant(crop_start), factor)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
