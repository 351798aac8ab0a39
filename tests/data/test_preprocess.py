"""Intensity normalisation and original grid <-> network grid (ltnet_keras.data.preprocess)."""
import json

import numpy as np
import pytest

from ltnet_keras.data.preprocess import (GridSpec, brain_bbox, check_network_shape,
                                         normalise_intensity)

rng = np.random.default_rng(0)


def _brain(shape=(40, 44, 36), start=(9, 7, 5), stop=(27, 35, 25)):
    """Random non-zero voxels inside a box, zeros elsewhere."""
    image = np.zeros(shape, dtype=np.float32)
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    image[box] = rng.uniform(0.1, 1.0, size=image[box].shape)
    return image


# --- intensities and bounding box -------------------------------------------------------------

def test_normalise_intensity_range_and_clipping():
    image = rng.normal(100.0, 20.0, size=(20, 20, 20))
    image[0, 0, 0] = 1e6  # an outlier must not squash the rest of the range
    out = normalise_intensity(image, upper_percentile=99.0)
    assert out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.mean(out == 1.0) == pytest.approx(0.01, abs=0.002)
    assert 0.3 < np.median(out) < 0.7


def test_normalise_intensity_rejects_constant_and_nan():
    with pytest.raises(ValueError, match="constant"):
        normalise_intensity(np.full((4, 4, 4), 3.0))
    with pytest.raises(ValueError, match="NaN"):
        normalise_intensity(np.array([[[0.0, np.nan]]]))


def test_brain_bbox():
    image = _brain()
    image[0, 0, 0] = 1e-4  # below 1% of the maximum: noise, not brain
    assert brain_bbox(image) == ((9, 7, 5), (27, 35, 25))
    assert brain_bbox(image, threshold=0.0)[0] == (0, 0, 0)
    assert brain_bbox(image > 0.5)[1] <= (27, 35, 25)
    with pytest.raises(ValueError, match="no voxel of the image or mask is above"):
        brain_bbox(np.zeros((3, 3, 3)))


# --- checks -----------------------------------------------------------------------------------

def test_check_network_shape():
    assert check_network_shape((160, 160, 128)) == (160, 160, 128)
    assert check_network_shape([80, 80, 64], divisor=16) == (80, 80, 64)
    with pytest.raises(ValueError, match=r"\(80, 80, 72\) must be divisible by 16.*4 poolings"):
        check_network_shape((80, 80, 72))
    with pytest.raises(ValueError, match="divisible by 8"):
        check_network_shape((0, 8, 8), divisor=8)


def test_gridspec_validation():
    with pytest.raises(ValueError, match=r"crop shape \(30, 32, 32\) is not divisible .* factor 4"):
        GridSpec((40, 40, 40), (0, 0, 0), (30, 32, 32), factor=4)
    with pytest.raises(ValueError, match="factor must be an integer >= 1"):
        GridSpec((40, 40, 40), (0, 0, 0), (32, 32, 32), factor=0)
    with pytest.raises(ValueError, match="three integers"):
        GridSpec((40, 40), (0, 0, 0), (32, 32, 32))
    with pytest.raises(ValueError, match="4 poolings"):
        GridSpec.centred_on(_brain(), (24, 32, 32), factor=1)
    with pytest.raises(ValueError, match="does not overlap"):
        GridSpec((10, 10, 10), (20, 0, 0), (4, 4, 4)).crop(np.zeros((10, 10, 10)))
    with pytest.raises(ValueError, match="does not match the original grid"):
        GridSpec((10, 10, 10), (0, 0, 0), (4, 4, 4)).crop(np.zeros((10, 10, 11)))


def test_gridspec_dict_round_trip():
    spec = GridSpec((160, 192, 160), (0, -3, 16), (160, 160, 128), factor=2)
    data = json.loads(json.dumps(spec.to_dict()))
    assert data == {"original_shape": [160, 192, 160], "crop_start": [0, -3, 16],
                    "crop_shape": [160, 160, 128], "factor": 2}
    again = GridSpec.from_dict(data)
    assert again == spec and again.network_shape == (80, 80, 64)
    with pytest.raises(ValueError, match="crop_start"):
        GridSpec.from_dict({"original_shape": [1, 1, 1], "crop_shape": [1, 1, 1]})


# --- crop / pad -------------------------------------------------------------------------------

def test_centred_on_crop_uncrop_identity():
    image = _brain()
    spec = GridSpec.centred_on(image, (32, 32, 32), factor=2, divisor=16)
    # box centre (18, 21, 15) minus half the crop
    assert spec.crop_start == (2, 5, -1)
    cropped = spec.crop(image)
    assert cropped.shape == (32, 32, 32)
    assert cropped.sum() == pytest.approx(image.sum(), rel=1e-6)
    np.testing.assert_array_equal(spec.uncrop(cropped), image)


def test_crop_larger_than_volume_pads_and_round_trips():
    image = rng.random((10, 12, 8)).astype(np.float32)
    spec = GridSpec(image.shape, (-3, -2, -4), (16, 16, 16))
    cropped = spec.crop(image)
    assert cropped.shape == (16, 16, 16)
    np.testing.assert_array_equal(cropped[3:13, 2:14, 4:12], image)
    assert cropped.sum() == pytest.approx(image.sum(), rel=1e-6)
    np.testing.assert_array_equal(spec.uncrop(cropped), image)


def test_crop_keeps_trailing_channel_axis():
    field = rng.random((10, 12, 8, 3))
    spec = GridSpec((10, 12, 8), (2, -2, 0), (8, 16, 8))
    cropped = spec.crop(field)
    assert cropped.shape == (8, 16, 8, 3)
    np.testing.assert_array_equal(cropped[:, 2:14], field[2:10])
    assert spec.to_network(field).shape == (8, 16, 8, 3)


# --- down-sampling ----------------------------------------------------------------------------

def test_image_downsampling_is_block_mean():
    spec = GridSpec((8, 8, 8), (0, 0, 0), (8, 8, 8), factor=2)
    image = np.zeros((8, 8, 8), dtype=np.float32)
    image[2:4, 4:6, 0:2] = 0.7  # exactly one block
    image[0, 0, 0] = 8.0  # one voxel of a block of 8
    out = spec.to_network(image, kind="image")
    assert out.shape == (4, 4, 4) and out.dtype == np.float32
    assert out[1, 2, 0] == pytest.approx(0.7)
    assert out[0, 0, 0] == pytest.approx(1.0)
    assert np.count_nonzero(out) == 2


def test_label_downsampling_keeps_existing_ids():
    labels = rng.choice([0, 21, 22, 45], size=(24, 24, 24)).astype(np.int32)
    spec = GridSpec(labels.shape, (0, 0, 0), (24, 24, 24), factor=3)
    out = spec.to_network(labels, kind="label")
    assert out.shape == (8, 8, 8) and out.dtype == np.int32
    assert set(np.unique(out)) <= {0, 21, 22, 45}
    # the voxel at the block centre
    assert out[2, 5, 7] == labels[2 * 3 + 1, 5 * 3 + 1, 7 * 3 + 1]
    one_hot = np.eye(4, dtype=np.float32)[rng.integers(0, 4, (24, 24, 24))]
    assert set(np.unique(spec.to_network(one_hot, kind="label"))) == {0.0, 1.0}
    with pytest.raises(ValueError, match="kind"):
        spec.to_network(labels, kind="nearest")


def test_labels_to_original():
    spec = GridSpec((10, 10, 10), (-1, 1, 2), (8, 8, 8), factor=2)
    net = np.arange(64, dtype=np.int32).reshape(4, 4, 4) + 1
    out = spec.labels_to_original(net)
    assert out.shape == (10, 10, 10)
    assert out[0, 1, 2] == net[0, 0, 0] and out[2, 4, 9] == net[1, 1, 3]
    assert out[9, 9, 9] == 0 and out[5, 0, 5] == 0  # outside the crop: background
    np.testing.assert_array_equal(spec.to_network(out, kind="label"), net)


# --- affine -----------------------------------------------------------------------------------

def test_affine_of_network_grid_matches_block_centres():
    affine = np.array([[-1.0, 0, 0, 80], [0, 0, 1.2, -90], [0, 1, 0, 20], [0, 0, 0, 1]])
    for factor in (1, 2, 3):
        spec = GridSpec((40, 44, 36), (-3, 4, 5), (12, 24, 18), factor=factor)
        net_affine = spec.affine_of_network_grid(affine)
        for voxel in ((0, 0, 0), (1, 2, 3), (3, 7, 5)):
            block = np.asarray(spec.crop_start) + np.asarray(voxel) * factor
            members = np.stack(np.meshgrid(*[np.arange(b, b + factor) for b in block],
                                           indexing="ij"), -1).reshape(-1, 3)
            centre_world = (affine[:3, :3] @ members.T + affine[:3, 3:]).T.mean(0)
            net_world = net_affine[:3, :3] @ np.asarray(voxel) + net_affine[:3, 3]
            np.testing.assert_allclose(net_world, centre_world, atol=1e-9)


# --- fields -----------------------------------------------------------------------------------

def test_constant_field_scales_inside_crop_and_is_zero_outside():
    spec = GridSpec((20, 22, 18), (3, -2, 2), (12, 16, 8), factor=4)
    field = np.zeros(spec.network_shape + (3,), dtype=np.float32)
    field[..., 0] = 1.0
    out = spec.field_to_original(field)
    assert out.shape == (20, 22, 18, 3) and out.dtype == np.float32
    inside = np.zeros((20, 22, 18), dtype=bool)
    inside[3:15, 0:14, 2:10] = True
    np.testing.assert_allclose(out[inside, 0], 4.0)
    np.testing.assert_array_equal(out[~inside], 0.0)
    np.testing.assert_array_equal(out[..., 1:], 0.0)


def test_linear_field_is_interpolated_between_block_centres():
    f = 2
    spec = GridSpec((20, 16, 12), (2, 0, -2), (16, 16, 16), factor=f)
    i, j, k = np.meshgrid(*[np.arange(n) for n in spec.network_shape], indexing="ij")
    field = np.stack([0.5 * i - 1.0, 0.25 * j, -k + 0.3 * i], -1).astype(np.float32)
    out = spec.field_to_original(field)
    # original voxel p lies at network coordinate (p - start - (f - 1) / 2) / f
    X, Y, Z = np.meshgrid(*[np.arange(n) for n in spec.original_shape], indexing="ij")
    qi, qj, qk = [(P - s - (f - 1) / 2) / f for P, s in zip((X, Y, Z), spec.crop_start)]
    expected = f * np.stack([0.5 * qi - 1.0, 0.25 * qj, -qk + 0.3 * qi], -1)
    # between the outermost block centres (beyond them the field keeps its edge value)
    n = spec.network_shape
    interior = ((qi >= 0) & (qi <= n[0] - 1) & (qj >= 0) & (qj <= n[1] - 1)
                & (qk >= 0) & (qk <= n[2] - 1))
    assert interior.sum() > 0.6 * interior.size
    np.testing.assert_allclose(out[interior], expected[interior], atol=1e-5)
    edge = out[2, 5, 0]  # qi = -0.25: before the first block centre, so it keeps its value
    np.testing.assert_allclose(edge[0], f * (0.5 * 0 - 1.0), atol=1e-6)
    with pytest.raises(ValueError, match="does not match the network grid"):
        spec.field_to_original(field[:-1])


def test_field_round_trip_at_block_centres():
    f = 3
    spec = GridSpec((30, 30, 30), (0, 3, 0), (24, 24, 24), factor=f)
    field = rng.normal(size=spec.network_shape + (3,)).astype(np.float32)
    out = spec.field_to_original(field)
    centres = spec.crop(out)[1::f, 1::f, 1::f]  # odd factor: block centre = original voxel
    np.testing.assert_allclose(centres, f * field, atol=1e-5)
    np.testing.assert_allclose(spec.to_network(out, kind="label"), f * field, atol=1e-5)


# --- real data --------------------------------------------------------------------------------

def test_paper_crop_on_real_subject(lpba40_root):
    from ltnet_keras.data.io import load_subject
    image, labels = load_subject(lpba40_root / "images" / "S01.nii.gz",
                                 lpba40_root / "labels" / "S01.nii.gz")
    spec = GridSpec.centred_on(image.array, (160, 160, 128), factor=2)
    assert spec.original_shape == (160, 192, 160) and spec.network_shape == (80, 80, 64)
    net_image = spec.to_network(image.array, kind="image")
    net_labels = spec.to_network(labels.array, kind="label")
    assert net_image.shape == net_labels.shape == (80, 80, 64)
    assert net_image.sum() * 8 == pytest.approx(image.array.sum(), rel=0.01)
    assert set(np.unique(net_labels)) <= set(np.unique(labels.array))
    world = spec.affine_of_network_grid(image.affine) @ np.array([10, 20, 30, 1.0])
    original_centre = np.asarray(spec.crop_start) + 2 * np.array([10, 20, 30]) + 0.5
    np.testing.assert_allclose(world, image.affine @ np.append(original_centre, 1.0))


def test_brain_bbox_equals_the_extremes_of_argwhere():
    """brain_bbox reads the box off per-axis projections (fast path of segment's reading);
    it must equal the straightforward box of every foreground voxel."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        image = np.zeros(tuple(rng.integers(2, 20, 3)))
        image[tuple(rng.integers(0, side, 5) for side in image.shape)] = 1.0
        where = np.argwhere(image > 0.01)
        assert brain_bbox(image) == (tuple(where.min(0)), tuple(where.max(0) + 1))
