"""The multi-atlas fast path's pieces (issue 28): composed alignments, resampling only the
scan's non-zero box, and ranking atlases on the field's grid."""
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from ltnet_keras.data.align import Alignment, to_atlas_space
from ltnet_keras.data.io import Volume
from ltnet_keras.inference.atlas_space import (compose, nonzero_box, ranking_similarity,
                                               to_atlas_space_box)


def random_affine(rng, scale=1.0):
    """A voxel-to-world affine with a rotation, anisotropic voxels and a shift."""
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    affine = np.eye(4)
    affine[:3, :3] = q @ np.diag(scale * rng.uniform(0.8, 1.3, 3))
    affine[:3, 3] = rng.uniform(-20, 20, 3)
    return affine


def random_world_map(rng):
    """A world-to-world affine near the identity (a small rotation, scaling and shift)."""
    matrix = np.eye(4)
    matrix[:3, :3] += 0.1 * rng.normal(size=(3, 3))
    matrix[:3, 3] = rng.uniform(-5, 5, 3)
    return matrix


def test_composed_alignment_maps_points_through_the_first_atlas():
    rng = np.random.default_rng(0)
    scan_affine, first_affine, atlas_affine = (random_affine(rng) for _ in range(3))
    scan_to_first = Alignment(random_world_map(rng), (20, 22, 24), first_affine, (30, 31, 32),
                              scan_affine, similarity=0.9)
    first_to_atlas = Alignment(random_world_map(rng), (18, 19, 21), atlas_affine, (20, 22, 24),
                               first_affine)
    composed = compose(scan_to_first, first_to_atlas)
    assert composed.atlas_shape == (18, 19, 21) and composed.scan_shape == (30, 31, 32)
    assert composed.similarity is None and composed.start == "composed"
    points = np.c_[rng.uniform(0, 18, (50, 3)), np.ones(50)].T   # atlas k voxels
    # Atlas k voxel -> first atlas voxel -> scan voxel, one map after the other.
    in_first = first_to_atlas.atlas_voxel_to_scan_voxel @ points
    expected = scan_to_first.atlas_voxel_to_scan_voxel @ in_first
    np.testing.assert_allclose(composed.atlas_voxel_to_scan_voxel @ points, expected,
                               rtol=0, atol=1e-9)
    np.testing.assert_allclose(composed.scan_voxel_to_atlas_voxel @ expected, points,
                               rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="moving image"):
        compose(first_to_atlas, scan_to_first)


def blob_scan(rng, shape=(40, 44, 38)):
    """A scan that is zero outside an off-centre blob (as a skull-stripped brain)."""
    array = np.zeros(shape, np.float32)
    inner = gaussian_filter(rng.random((14, 18, 12)), 1.0).astype(np.float32) + 0.2
    array[9:23, 20:38, 5:17] = inner
    return array


@pytest.mark.parametrize("whole", [False, True])
def test_box_resampling_equals_whole_grid_resampling(whole):
    rng = np.random.default_rng(1)
    array = blob_scan(rng)
    if whole:   # non-zero everywhere: the box is the whole grid
        array += 0.05
    scan = Volume(array, random_affine(rng), None, "scan.nii.gz")
    atlas_affine = random_affine(rng, 1.1)
    alignment = Alignment(random_world_map(rng), (36, 40, 42), atlas_affine, scan.shape,
                          scan.affine)
    # A world map placing the blob inside the atlas grid: centre onto centre.
    centre_scan = scan.affine @ np.r_[np.array(scan.shape) / 2, 1]
    centre_atlas = alignment.atlas_to_scan @ atlas_affine @ np.r_[np.array((36, 40, 42)) / 2, 1]
    alignment.atlas_to_scan[:3, 3] += (centre_scan - centre_atlas)[:3]
    full = to_atlas_space(scan, alignment).array
    boxed = to_atlas_space_box(scan, alignment).array
    assert full.shape == boxed.shape and boxed.dtype == np.float32
    assert np.count_nonzero(full) > 1000   # the blob landed on the atlas grid
    np.testing.assert_allclose(boxed, full, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(boxed == 0, full == 0)
    if not whole:   # the box saved work: most of the atlas grid is outside it
        start, stop = nonzero_box(boxed)
        assert np.prod(stop - start) < 0.5 * boxed.size


def test_nonzero_box():
    array = np.zeros((5, 6, 7))
    assert [b.tolist() for b in nonzero_box(array)] == [[0, 0, 0], [0, 0, 0]]
    array[1, 2, 3] = array[3, 4, 3] = -1.0
    assert [b.tolist() for b in nonzero_box(array)] == [[1, 2, 3], [4, 5, 4]]


def test_ranking_prefers_the_atlas_its_field_carries_onto_the_target():
    rng = np.random.default_rng(2)
    target = gaussian_filter(rng.random((32, 32, 32)), 2.0).astype(np.float32)
    shifted = np.roll(target, 4, axis=0)                 # the target, moved 4 voxels
    other = gaussian_filter(rng.random(target.shape), 2.0).astype(np.float32)
    zero = np.zeros((16, 16, 16, 3), np.float32)         # on the factor-2 grid
    undo = zero.copy()
    undo[..., 0] = 2.0                                   # 4 voxels at factor 2: shifted(i + 4)
    near = ranking_similarity(shifted, target, undo, 2)
    assert near > 0.9   # all but the rolled-over edge matches
    assert near > ranking_similarity(shifted, target, zero, 2)   # the field counts
    assert near > ranking_similarity(other, target, undo, 2) + 0.3
    with pytest.raises(ValueError, match="field"):
        ranking_similarity(shifted, target, zero, 4)


@pytest.mark.parametrize("whole", [False, True])
def test_normalised_crop_equals_normalising_the_whole_grid(whole):
    from ltnet_keras.data.preprocess import GridSpec, normalise_intensity
    from ltnet_keras.inference.atlas_space import normalised_crop
    rng = np.random.default_rng(3)
    array = np.zeros((40, 44, 38), np.float32)
    array[6:30, 10:40, 4:34] = 100 * rng.random((24, 30, 30))
    box = (np.array([6, 10, 4]), np.array([30, 40, 34]))
    if whole:   # no zeros outside the box: the whole grid is normalised
        array += 1.0
        box = (np.zeros(3, int), np.array(array.shape))
    for start in ((0, 0, 0), (-4, 8, 2)):   # inside the grid, and a crop reaching beyond it
        grid = GridSpec(tuple(array.shape), start, (32, 32, 32), 4)
        expected = grid.crop(normalise_intensity(array))
        got = normalised_crop(array, box, grid)
        assert got.dtype == np.float32 and got.shape == (32, 32, 32)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
        assert np.count_nonzero(got == 1.0) == np.count_nonzero(expected == 1.0)


def _whole_grid_labels(segmenter, scan, alignment):
    """The aligned path done the straightforward way: the whole scan resampled onto the atlas
    grid, normalised over the whole grid, G_F, and every label look-up of the scan's grid
    bounded only by the largest displacement."""
    from ltnet_keras.data.dataset import prepare_volumes
    data = segmenter.config.data
    aligned = to_atlas_space(scan, alignment)
    target = prepare_volumes(aligned, None, data.crop_shape, data.factor, "scan",
                             segmenter._crop_window)
    field = np.asarray(segmenter.forward_field(target))
    offset = (np.array(segmenter.atlas.grid.crop_start)
              - np.array(target.grid.crop_start)).astype(np.float32)
    return segmenter._labels_through(alignment, field, target.grid.crop_start, offset,
                                     data.factor), field


@pytest.mark.slow
def test_aligned_path_gives_the_whole_grid_labels_and_one_atlas_fast_path_the_same(lpba40_root):
    """One fixed alignment (no ANTs): ``Segmenter.segment`` (the scan resampled and normalised
    only in its box, labels looked up only in the region the field can carry) gives the label
    map of the whole-grid computation, and the multi-atlas path with that one atlas the same;
    two atlases give the vote of their maps in the ranked order."""
    from pathlib import Path

    from ltnet_keras.data.io import load_image
    from ltnet_keras.inference.fusion import majority_vote
    from ltnet_keras.inference.multi_atlas import MultiAtlasSegmenter
    from ltnet_keras.inference.segment import Segmenter
    run = Path(__file__).resolve().parents[2] / "results" / "recipe" / "voxelmorph"
    scan_path = lpba40_root / "images" / "S31.nii.gz"
    scan = load_image(scan_path)
    segmenters = [Segmenter(run, atlas_image=lpba40_root / "images" / f"{s}.nii.gz",
                            atlas_labels=lpba40_root / "labels" / f"{s}.nii.gz", align="affine")
                  for s in ("S13", "S30")]
    # A small turn about the grid's centre and a shift: the scan's voxels land between the
    # atlas' ones, as after a registration.
    angle = np.deg2rad(4.0)
    turn = np.eye(4)
    turn[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    centre = scan.affine @ np.r_[np.array(scan.shape) / 2.0, 1.0]
    to_centre, back = np.eye(4), np.eye(4)
    to_centre[:3, 3], back[:3, 3] = -centre[:3], centre[:3] + [1.3, -0.7, 0.4]
    for segmenter in segmenters:
        alignment = Alignment(back @ turn @ to_centre, segmenter.atlas_volume.shape,
                              segmenter.atlas_volume.affine, scan.shape, scan.affine,
                              similarity=0.9)
        segmenter.alignment = lambda _scan, alignment=alignment: alignment
    single = segmenters[0].segment(scan_path)
    expected, field = _whole_grid_labels(segmenters[0], scan, segmenters[0].alignment(scan))
    assert single.labels.dtype == segmenters[0].atlas_labels.dtype
    assert np.count_nonzero(expected) > 100_000
    np.testing.assert_array_equal(single.labels, expected)
    np.testing.assert_allclose(single.network_field, field, rtol=0, atol=1e-4)
    fast = MultiAtlasSegmenter.from_segmenters(segmenters[:1]).segment(scan_path)
    np.testing.assert_array_equal(fast.labels, single.labels)
    np.testing.assert_allclose(fast.forward_field, single.forward_field, rtol=0, atol=1e-4)
    # Two atlases, each with its own (given) alignment: the vote of the maps in ranked order.
    both = MultiAtlasSegmenter.from_segmenters(segmenters, compose_alignments=False)
    both.keep_maps = True
    fused = both.segment(scan_path).labels
    np.testing.assert_array_equal(fused, majority_vote([both.last_maps[i]
                                                        for i in both.last_order]))
    np.testing.assert_array_equal(both.last_maps[0], single.labels)
    assert sorted(both.last_order) == [0, 1]


@pytest.mark.parametrize("offset", [(0.0, 0.0, 0.0), (3.0, -2.0, 1.0)])
def test_label_region_holds_every_point_the_field_carries_onto_the_labels(offset):
    """Brute force on a small grid: every atlas voxel whose sampling position (the field read
    as the label transfer reads it, ``field_to_grid``) falls near the labelled box lies in
    :func:`label_region`, which is tighter than the largest-displacement bound."""
    from ltnet_keras.inference.atlas_space import label_region
    from ltnet_keras.inference.transfer import field_to_grid
    rng = np.random.default_rng(4)
    shape, crop_start, factor = (48, 44, 40), (6, 4, 2), 2
    field = gaussian_filter(rng.normal(size=(16, 16, 16, 3)), (2, 2, 2, 0)).astype(np.float32)
    field *= 1.5 / np.abs(field).max()          # up to 3 voxels at 1 mm
    field[0, :, :, 0] = -6.0                     # a rim pulling from 12 voxels away
    labelled = (np.array([18.0, 16.0, 14.0]), np.array([28.0, 27.0, 25.0]))
    offset = np.array(offset, np.float32)
    low, high = label_region(field, factor, crop_start, offset, labelled, shape)
    full = field_to_grid(field, shape, np.array(crop_start, np.int32), factor).numpy()
    voxels = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    positions = voxels + full + offset
    near = np.all((positions >= labelled[0] - 2.0) & (positions <= labelled[1] + 2.0), -1)
    assert near.sum() > 500
    inside = np.all((voxels >= low) & (voxels <= high), -1)
    assert not np.any(near & ~inside)
    # The rim far from the labels widens the largest-displacement bound, not the region.
    reach = np.abs(field).max(axis=(0, 1, 2)) * factor + np.abs(offset) + 2.0
    bound = (np.maximum(labelled[0] - reach, -0.5), np.minimum(labelled[1] + reach, 47.5))
    assert high[0] - low[0] < 0.75 * (bound[1][0] - bound[0][0])
