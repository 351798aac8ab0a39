"""Alignment to the atlas: reorientation and resampling round trips, the ANTs conventions, the
affine registration, the label transfer back to the scan's grid, and `ltnet segment --align`."""
import json
from pathlib import Path

import ltnet_keras  # noqa: F401  (must precede TensorFlow)

import nibabel as nib
import numpy as np
import pytest

from ltnet_keras.data import align
from ltnet_keras.data.align import (Alignment, AlignmentCache, RegistrationSettings, reorient,
                               resample, resample_volume, voxel_map)
from ltnet_keras.config import config_from_dict
from ltnet_keras.data.io import Volume, load_image, output_suffix, save_volume
from ltnet_keras.data.moved import HeadMove, conformed_grid, move_volume, random_move
from ltnet_keras.data.synthetic import make_synthetic_subject

REPO = Path(__file__).resolve().parents[2]
COMMITTED_RUN = REPO / "results" / "demo_voxelmorph_1000"   # atlas S13, 32x48x32 network grid


def random_labels(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([0, 3, 7, 21, 182], dtype=np.int32), size=shape)


def world_of(affine, shape):
    """World position of every voxel, ``shape + (3,)``."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return grid @ affine[:3, :3].T + affine[:3, 3]


def axis_affine(codes, spacing=1.0, origin=(3.0, -7.0, 11.0)):
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for axis, (world_axis, flip) in enumerate(nib.orientations.axcodes2ornt(codes)):
        affine[int(world_axis), axis] = flip * spacing
    affine[:3, 3] = origin
    return affine


# ------------------------------------------------------------------------------ reorientation

@pytest.mark.parametrize("source", [("L", "P", "S"), ("L", "I", "A"), ("R", "A", "S"),
                                    ("P", "S", "R")])
@pytest.mark.parametrize("target", [("L", "P", "S"), ("L", "I", "A"), ("S", "R", "P")])
def test_reorient_keeps_every_voxel_at_its_world_position(source, target):
    labels = random_labels((5, 6, 7))
    volume = Volume(labels, axis_affine(source, 1.5), None, "x.nii.gz")
    moved = reorient(volume, target)
    assert align.axis_codes(moved.affine) == target
    # same multiset of (world position, value) pairs: sort both by world position
    before = np.c_[world_of(volume.affine, labels.shape).reshape(-1, 3), labels.reshape(-1, 1)]
    after = np.c_[world_of(moved.affine, moved.shape).reshape(-1, 3), moved.array.reshape(-1, 1)]
    order = lambda a: a[np.lexsort(a[:, :3].T)]  # noqa: E731
    np.testing.assert_allclose(order(after), order(before), atol=1e-9)
    back = reorient(moved, source)
    np.testing.assert_array_equal(back.array, labels)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-12)


# ------------------------------------------------------------------------------ resampling

def test_resample_onto_a_reoriented_grid_and_back_is_exact_for_labels():
    labels = random_labels((9, 10, 11))
    source = Volume(labels, axis_affine(("L", "P", "S")), None, "x.nii.gz")
    lia = reorient(source, ("L", "I", "A"))          # the target grid, built independently
    there = resample_volume(source, lia.shape, lia.affine, "label")
    np.testing.assert_array_equal(there.array, lia.array)
    back = resample_volume(there, source.shape, source.affine, "label")
    np.testing.assert_array_equal(back.array, labels)
    assert back.array.dtype == labels.dtype


def test_resample_to_a_finer_grid_and_back_is_exact_for_labels():
    labels = random_labels((6, 7, 8))
    source = Volume(labels, axis_affine(("L", "P", "S"), 2.0), None, "x.nii.gz")
    fine = axis_affine(("L", "P", "S"), 1.0, origin=source.affine[:3, 3])   # voxel 2k = old k
    up = resample_volume(source, (12, 14, 16), fine, "label")
    np.testing.assert_array_equal(up.array[::2, ::2, ::2], labels)
    back = resample_volume(up, source.shape, source.affine, "label")
    np.testing.assert_array_equal(back.array, labels)


def test_a_grid_preserving_move_and_its_inverse_bring_labels_back_exactly():
    """A 90 degree turn about z plus a whole-millimetre shift maps voxel centres onto voxel
    centres, so nearest neighbour is exact both ways; the 256^3 LIA grid of FreeSurfer too."""
    labels = random_labels((11, 13, 15), seed=3)   # odd sizes: the centre is a voxel centre
    source = Volume(labels, axis_affine(("L", "P", "S"), origin=(0.0, 0.0, 0.0)), None, "x")
    move = HeadMove(axis=(0.0, 0.0, 1.0), degrees=90.0, shift_mm=(2.0, -1.0, 3.0), scale=1.0,
                    centre=(-5.0, -6.0, 7.0)).matrix    # about the volume's centre voxel
    shape, affine = conformed_grid(source, (32, 32, 32))
    moved = move_volume(source, move, shape, affine, "label")
    assert np.count_nonzero(moved.array) == np.count_nonzero(labels)   # nothing lost or doubled
    back = move_volume(moved, np.linalg.inv(move), source.shape, source.affine, "label")
    np.testing.assert_array_equal(back.array, labels)


def test_trilinear_resampling_at_half_voxels_averages_neighbours():
    image = np.random.default_rng(1).random((6, 6, 6)).astype(np.float32)
    shift = np.eye(4)
    shift[0, 3] = 0.5
    out = resample(image, shift, (5, 6, 6), "image")
    np.testing.assert_allclose(out, 0.5 * (image[:-1] + image[1:]), atol=1e-6)
    with pytest.raises(ValueError, match="'image' or 'label'"):
        resample(image, shift, (5, 6, 6), "cubic")


def test_zoom_grid_keeps_the_field_of_view():
    affine = axis_affine(("L", "I", "A"))
    shape, coarse = align.zoom_grid((256, 256, 256), affine, 4.0)
    assert shape == (64, 64, 64)
    np.testing.assert_allclose(align.voxel_sizes(coarse), 4.0)
    # coarse voxel 0 is centred on the first 4^3 block: old voxel (1.5, 1.5, 1.5)
    np.testing.assert_allclose(coarse[:3, 3], (affine @ [1.5, 1.5, 1.5, 1.0])[:3])


@pytest.mark.parametrize("codes,spacing", [(("L", "I", "A"), 1.0), (("R", "A", "S"), 1.25)])
def test_registration_image_is_the_block_mean_on_the_atlas_axes(codes, spacing):
    image = np.random.default_rng(2).random((24, 24, 24)).astype(np.float32)
    volume = Volume(image, axis_affine(codes, spacing), None, "x")
    coarse = align.registration_image(volume, ("L", "P", "S"), 3.0 * spacing)
    assert align.axis_codes(coarse.affine) == ("L", "P", "S")
    lps = reorient(volume, ("L", "P", "S")).array
    np.testing.assert_allclose(coarse.array[1, 2, 3], lps[3:6, 6:9, 9:12].mean(), rtol=1e-5)
    # the coarse voxel sits at the centre of its block in the world
    centre = reorient(volume, ("L", "P", "S")).affine @ [4.0, 7.0, 10.0, 1.0]
    np.testing.assert_allclose(coarse.affine @ [1, 2, 3, 1.0], centre, atol=1e-9)


def test_registration_image_of_an_oblique_scan_keeps_things_where_they_are():
    """An obliquely stored scan (axes turned 15 degrees, 1.3 mm voxels) is straightened onto
    the atlas' axes at 3 mm: a blob stays at its world position."""
    affine = HeadMove((0.0, 1.0, 0.0), 15.0, (0.0, 0.0, 0.0), 1.0, (0.0, 0.0, 0.0)).matrix
    affine = affine @ np.diag([1.3, 1.3, 1.3, 1.0])
    affine[:3, 3] = (5.0, -8.0, 2.0)
    blob_voxel = np.array([14.0, 20.0, 11.0])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (30, 36, 28)], indexing="ij"), -1)
    image = np.exp(-np.sum((grid - blob_voxel) ** 2, -1) / (2 * 3.0 ** 2)).astype(np.float32)
    coarse = align.registration_image(Volume(image, affine, None, "x"), ("L", "P", "S"), 3.0)
    assert align.axis_codes(coarse.affine) == ("L", "P", "S")
    np.testing.assert_allclose(np.abs(coarse.affine[:3, :3]), 3.0 * np.eye(3))
    weights = coarse.array / coarse.array.sum()
    centre = world_of(coarse.affine, coarse.shape).reshape(-1, 3).T @ weights.ravel()
    np.testing.assert_allclose(centre, (affine @ np.append(blob_voxel, 1.0))[:3], atol=0.5)


# ------------------------------------------------------------------------------ moves, ANTs

def test_head_move_is_a_similarity_about_its_centre():
    move = HeadMove(axis=(0.0, 0.0, 1.0), degrees=90.0, shift_mm=(1.0, 2.0, 3.0), scale=1.05,
                    centre=(10.0, 20.0, 30.0))
    m = move.matrix
    np.testing.assert_allclose(m[:3, :3] / 1.05, [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)
    np.testing.assert_allclose(m @ [10.0, 20.0, 30.0, 1.0], [11.0, 22.0, 33.0, 1.0])


def test_random_moves_stay_within_their_limits():
    rng = np.random.default_rng(0)
    volume = Volume(np.zeros((4, 4, 4)), np.eye(4), None, "x")
    for _ in range(50):
        move = random_move(rng, volume)
        assert 0 <= move.degrees <= 10 and np.linalg.norm(move.shift_mm) <= 10
        assert 0.95 <= move.scale <= 1.05


def test_conformed_grid_is_freesurfer_like():
    volume = Volume(np.zeros((160, 192, 160)), axis_affine(("L", "P", "S")), None, "x")
    shape, affine = conformed_grid(volume)
    assert shape == (256, 256, 256) and align.axis_codes(affine) == ("L", "I", "A")
    np.testing.assert_allclose(align.voxel_sizes(affine), 1.0)
    np.testing.assert_allclose((affine @ [128, 128, 128, 1.0])[:3],
                               (volume.affine @ [79.5, 95.5, 79.5, 1.0])[:3])


def test_ants_images_carry_the_world_positions_in_lps():
    import ants
    affine = axis_affine(("L", "I", "A"), 2.0)
    image = align._to_ants(Volume(np.zeros((4, 5, 6), np.float32), affine, None, "x"))
    for index in [(0, 0, 0), (3, 1, 2), (1, 4, 5)]:
        ras = affine @ np.append(index, 1.0)
        lps = ants.transform_index_to_physical_point(image, index)
        np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-5)


def synthetic_volume(affine, seed=0):
    image, labels = make_synthetic_subject((48, 48, 48), seed=seed, max_displacement=0)
    return Volume(image, affine, None, "atlas.nii.gz"), Volume(labels, affine, None, "atlas")


def moved_synthetic_scan():
    """A synthetic 2 mm atlas, a known move (8 deg, 8 mm, 4 %), the atlas moved by it onto
    another grid, and brain points of the atlas (world mm, homogeneous) to compare maps on."""
    atlas, _ = synthetic_volume(axis_affine(("L", "P", "S"), 2.0))
    move = HeadMove(axis=(0.3, -0.5, 0.8), degrees=8.0, shift_mm=(6.0, -4.0, 3.0), scale=1.04,
                    centre=tuple((atlas.affine @ [23.5, 23.5, 23.5, 1.0])[:3]))
    shape, affine = conformed_grid(atlas, (56, 56, 56), spacing=2.0)
    scan = Volume(move_volume(atlas, move.matrix, shape, affine).array, affine, None, "scan")
    brain = np.argwhere(atlas.array > 0)[::20]
    return atlas, move, scan, np.c_[brain, np.ones(len(brain))] @ atlas.affine.T


def test_register_affine_recovers_a_known_move():
    atlas, move, scan, points = moved_synthetic_scan()
    settings = RegistrationSettings(spacing=2.0, iterations=(100, 50), shrink_factors=(2, 1),
                                    smoothing_sigmas=(1, 0), seed=1)
    alignment = align.register_affine(scan, atlas, settings)
    # atlas_to_scan should be the move itself: compare where brain points land, in mm
    error = np.linalg.norm((points @ alignment.atlas_to_scan.T - points @ move.matrix.T)[:, :3],
                           axis=1)
    assert error.mean() < 0.5 and error.max() < 1.5, (error.mean(), error.max())
    assert set(alignment.seconds) == {"registration_resample", "registration_start",
                                      "registration_ants", "registration_similarity"}
    # a small move needs no half turn: ANTs' own start, as before the start search
    assert alignment.start == "identity" and set(alignment.start_scores) == {"identity", "x",
                                                                             "y", "z"}
    # the same seed gives the same registration (up to ITK's multi-threaded sums)
    again = align.register_affine(scan, atlas, settings)
    difference = np.linalg.norm((points @ (again.atlas_to_scan - alignment.atlas_to_scan).T)
                                [:, :3], axis=1)
    assert difference.max() < 0.1, difference.max()


def test_atlas_grids_made_ahead_give_the_same_registration():
    atlas, _, scan, points = moved_synthetic_scan()
    settings = RegistrationSettings(spacing=4.0, iterations=(30,), shrink_factors=(1,),
                                    smoothing_sigmas=(0,), seed=1)
    grids = align.RegistrationGrids.of(atlas, 4.0)
    assert grids.image.shape == (24, 24, 24) and grids.fine.shape == (32, 32, 32)
    ahead = align.register_affine(scan, atlas, settings, atlas_grids=grids)
    plain = align.register_affine(scan, atlas, settings)
    # the same up to ITK's multi-threaded sums (bit for bit on one thread)
    difference = np.linalg.norm((points @ (ahead.atlas_to_scan - plain.atlas_to_scan).T)
                                [:, :3], axis=1)
    assert difference.max() < 0.1, difference.max()
    assert ahead.similarity == pytest.approx(plain.similarity, abs=1e-3)
    with pytest.raises(ValueError, match="at 3.0 mm, the registration at 4.0 mm"):
        align.register_affine(scan, atlas, settings, atlas_grids=align.RegistrationGrids.of(
            atlas, 3.0))


def test_registration_settings_are_checked():
    with pytest.raises(ValueError, match="Affine, Rigid, Similarity"):
        RegistrationSettings(transform="SyN")
    with pytest.raises(ValueError, match="seed must be an integer >= 1"):
        RegistrationSettings(seed=0)
    with pytest.raises(ValueError, match="one entry per resolution level"):
        RegistrationSettings(iterations=(10,), shrink_factors=(2, 1), smoothing_sigmas=(1, 0))


# ------------------------------------------------------------------------------ Alignment

def test_alignment_maps_are_inverse_and_survive_json():
    rng = np.random.default_rng(4)
    world = np.eye(4)
    world[:3, :3] += 0.05 * rng.standard_normal((3, 3))
    world[:3, 3] = rng.uniform(-5, 5, 3)
    alignment = Alignment(world, (20, 24, 20), axis_affine(("L", "P", "S")), (32, 32, 32),
                          axis_affine(("L", "I", "A")))
    np.testing.assert_allclose(alignment.scan_voxel_to_atlas_voxel
                               @ alignment.atlas_voxel_to_scan_voxel, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(alignment.atlas_voxel_to_scan_voxel,
                               voxel_map(alignment.scan_affine, alignment.atlas_affine, world))
    again = Alignment.from_dict(json.loads(json.dumps(alignment.to_dict())))
    np.testing.assert_allclose(again.atlas_to_scan, world)
    assert again.scan_shape == (32, 32, 32)


def test_scan_box_holds_every_scan_voxel_that_sees_the_atlas_grid():
    atlas = Volume(np.zeros((20, 24, 18)), axis_affine(("L", "P", "S")), None, "atlas")
    world = HeadMove((1.0, 1.0, 0.0), 9.0, (3.0, -2.0, 1.0), 1.04, (-6.0, -18.0, 20.0)).matrix
    scan_shape, scan_affine = conformed_grid(atlas, (48, 48, 48))
    alignment = Alignment(world, atlas.shape, atlas.affine, scan_shape, scan_affine)
    start, stop = alignment.scan_box(margin=0)
    voxels = np.argwhere(np.ones(alignment.scan_shape, bool))
    atlas_points = np.c_[voxels, np.ones(len(voxels))] @ alignment.scan_voxel_to_atlas_voxel.T
    sees = np.all((atlas_points[:, :3] >= -0.5)
                  & (atlas_points[:, :3] <= np.array(alignment.atlas_shape) - 0.5), axis=1)
    inside = np.all((voxels >= start) & (voxels < stop), axis=1)
    assert sees.any() and not np.any(sees & ~inside)
    assert inside.mean() < 0.9            # and it does leave voxels out


def test_to_atlas_space_with_an_identity_alignment_is_the_same_image_in_place():
    image = np.random.default_rng(5).random((8, 9, 10)).astype(np.float32)
    atlas_affine = axis_affine(("L", "P", "S"))
    scan = reorient(Volume(image, atlas_affine, None, "s"), ("L", "I", "A"))
    aligned = align.to_atlas_space(scan, Alignment.identity(scan, image.shape, atlas_affine))
    np.testing.assert_array_equal(aligned.array, image)


def test_alignment_cache_registers_each_scan_once(tmp_path, monkeypatch):
    calls = []

    def fake_register(scan, atlas, settings=None):
        calls.append(scan.path)
        alignment = Alignment.identity(scan, atlas.shape, atlas.affine)
        alignment.similarity = 0.9
        return alignment

    monkeypatch.setattr(align, "register_affine", fake_register)
    affine = axis_affine(("L", "P", "S"))
    atlas = Volume(np.ones((6, 6, 6), np.float32), affine, None, str(tmp_path / "atlas.nii.gz"))
    save_volume(atlas.array, atlas.path, affine)
    scan_path = tmp_path / "S1.mgz"
    save_volume(np.arange(216, dtype=np.float32).reshape(6, 6, 6), scan_path, affine)
    cache = AlignmentCache(tmp_path / "aligned")
    first = cache.aligned_image(scan_path, atlas)
    second = cache.aligned_image(scan_path, atlas)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.array, second.array)
    assert (tmp_path / "aligned" / "S1.json").exists()
    assert cache.alignment(load_image(scan_path), atlas).seconds.keys() == {"registration_cached"}
    # a changed scan file is aligned again
    save_volume(np.ones((6, 6, 6), np.float32) * 2, scan_path, affine)
    cache.aligned_image(scan_path, atlas)
    assert len(calls) == 2


# ------------------------------------------------------------------------------ options, format

def test_data_align_is_validated():
    assert config_from_dict({"data": {"align": "affine", "atlas": "S01"}}).data.align == "affine"
    assert config_from_dict({}).data.align == "none"
    with pytest.raises(ValueError, match="data.align 'rigid'; valid: none, affine"):
        config_from_dict({"data": {"align": "rigid", "atlas": "S01"}})
    with pytest.raises(ValueError, match="data.atlas set to a subject id"):
        config_from_dict({"data": {"align": "affine"}})
    with pytest.raises(ValueError, match="valid: none, affine"):
        align.check_align_mode("ants")


def test_segment_command_aligns_by_default():
    from ltnet_keras.cli import build_parser
    args = build_parser().parse_args(["segment", "--run", "r", "--image", "a.mgz", "--out", "o"])
    assert args.align == "affine" and not args.save_aligned
    args = build_parser().parse_args(["segment", "--run", "r", "--image", "a.mgz", "--out", "o",
                                      "--align", "none", "--save-aligned"])
    assert args.align == "none" and args.save_aligned


@pytest.mark.parametrize("name,suffix", [("S01.mgz", ".mgz"), ("S01.nii.gz", ".nii.gz"),
                                         ("S01.nii", ".nii"), ("S01.npz", ".nii.gz"),
                                         ("brain.MGZ", ".mgz")])
def test_output_suffix_follows_the_input(name, suffix):
    assert output_suffix(Path("/data") / name) == suffix


def test_labels_written_with_a_float_mgz_header_stay_integers(tmp_path):
    affine = axis_affine(("L", "I", "A"))
    save_volume(np.random.default_rng(0).random((4, 4, 4)).astype(np.float32),
                tmp_path / "scan.mgz", affine)
    header = nib.load(str(tmp_path / "scan.mgz")).header
    labels = random_labels((4, 4, 4))
    save_volume(labels, tmp_path / "labels.mgz", affine, header)
    written = nib.load(str(tmp_path / "labels.mgz"))
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)


# ------------------------------------------------------------------------------ label transfer

def test_field_at_points_matches_the_field_on_the_grid():
    import tensorflow as tf

    from ltnet_keras.inference.segment import field_at_points, field_to_grid
    rng = np.random.default_rng(6)
    field = tf.constant(rng.standard_normal((4, 5, 3, 3)).astype(np.float32))
    shape, crop_start, factor = (20, 22, 14), (1, -1, 2), 4
    on_grid = field_to_grid(field, shape, crop_start, factor).numpy()
    points = np.argwhere(np.ones(shape, bool)).astype(np.float32)
    at_points = field_at_points(field, tf.constant(points), crop_start, factor).numpy()
    np.testing.assert_allclose(at_points.reshape(shape + (3,)), on_grid, atol=1e-5)


@pytest.fixture(scope="module")
def committed_run(lpba40_root):
    if not (COMMITTED_RUN / "forward_generator.h5").exists():
        pytest.skip("the committed run results/demo_voxelmorph_1000 is missing")
    return COMMITTED_RUN


@pytest.fixture(scope="module")
def segmenters(committed_run):
    """The committed run loaded once for each alignment mode."""
    from ltnet_keras.inference.segment import Segmenter
    return {align: Segmenter(committed_run, align=align) for align in ("none", "affine")}


@pytest.fixture(scope="module")
def s31_in_place(segmenters, lpba40_root):
    """S31 as distributed (in the atlas' space), segmented without alignment."""
    return segmenters["none"].segment(lpba40_root / "images" / "S31.nii.gz")


@pytest.mark.slow
def test_exactly_reoriented_scan_gets_the_in_place_labels(segmenters, s31_in_place, lpba40_root,
                                                          tmp_path, monkeypatch):
    """The scan stored LIA without interpolation and aligned by the identity: the aligned path
    (inverse affine + field in one lookup) must give the in-place labels, reoriented."""
    source = load_image(lpba40_root / "images" / "S31.nii.gz")
    lia = reorient(source, ("L", "I", "A"))
    path = save_volume(lia.array, tmp_path / "S31.nii.gz", lia.affine)
    segmenter = segmenters["affine"]
    monkeypatch.setattr(segmenter, "alignment",
                        lambda scan: Alignment.identity(scan, source.shape, source.affine))
    result = segmenter.segment_to_files(path, tmp_path / "out")
    written = nib.load(str(tmp_path / "out" / "S31.nii.gz"))        # .nii.gz in, .nii.gz out
    assert written.shape == lia.shape
    np.testing.assert_allclose(written.affine, lia.affine, atol=1e-5)
    # Back to the source's own axes, whatever its header says (not a hard-coded orientation).
    back = reorient(Volume(np.asarray(written.dataobj), written.affine, None, "x"),
                    align.axis_codes(source.affine))
    agreement = np.mean(back.array == s31_in_place.labels)
    assert agreement > 0.9999, agreement
    assert result.forward_field.shape == source.shape + (3,)


@pytest.mark.slow
def test_moved_mgz_scan_segments_like_the_unmoved_one(segmenters, s31_in_place, lpba40_root,
                                                      tmp_path):
    """A shipped scan moved in the scanner (8 deg, 7 mm, 4 %) and stored as FreeSurfer does
    (256^3 LIA .mgz): aligned, it gives a .mgz on its own grid no more than 1 Dice point
    below the unmoved scan segmented in place (above is fine: the affine can place the scan
    nearer the atlas than the common space did; the 6 mm budget gives +1.5 here)."""
    from ltnet_keras.data.io import load_subject
    from ltnet_keras.data.labels import LabelTable
    from ltnet_keras.evaluation import evaluate_pair
    table = LabelTable.from_tsv(lpba40_root / "labels.tsv")
    image, labels = load_subject(lpba40_root / "images" / "S31.nii.gz",
                                 lpba40_root / "labels" / "S31.nii.gz")
    # About the scan's centre voxel in its own world coordinates (from its header).
    centre = tuple((image.affine @ [*((np.array(image.shape) - 1) / 2.0), 1.0])[:3])
    move = HeadMove(axis=(0.6, -0.3, 0.74), degrees=8.0, shift_mm=(4.0, -5.0, 3.0), scale=1.04,
                    centre=centre).matrix
    shape, affine = conformed_grid(image)
    save_volume(move_volume(image, move, shape, affine).array, tmp_path / "S31.mgz", affine)
    moved_labels = move_volume(labels, move, shape, affine, "label").array

    segmenters["affine"].segment_to_files(tmp_path / "S31.mgz", tmp_path / "out",
                                          save_aligned=True)
    written = nib.load(str(tmp_path / "out" / "S31.mgz"))
    assert isinstance(written, nib.MGHImage) and written.shape == (256, 256, 256)
    np.testing.assert_allclose(written.affine, affine, atol=1e-4)
    assert np.issubdtype(written.get_data_dtype(), np.integer)
    aligned = nib.load(str(tmp_path / "out" / "aligned" / "S31.mgz"))
    assert aligned.shape == image.shape                                  # the atlas grid
    moved_dice = evaluate_pair(np.asarray(written.dataobj), moved_labels, table).mean_structure

    in_place_dice = evaluate_pair(s31_in_place.labels, labels.array, table).mean_structure
    assert in_place_dice > 0.65
    assert moved_dice > in_place_dice - 0.01, (moved_dice, in_place_dice)


@pytest.mark.slow
def test_segment_refuses_a_scan_that_is_not_a_head(segmenters, lpba40_root, tmp_path):
    """Smooth noise in a head-sized ellipsoid, on a 2 mm grid with the atlas' field of view:
    aligned, it resembles the atlas too little; segment refuses it by name, writing nothing."""
    from ltnet_keras.data.alignment_check import not_a_head
    from ltnet_keras.data.errors import VolumeError
    atlas = load_image(lpba40_root / "images" / "S13.nii.gz")
    like = Volume(np.zeros((80, 96, 80), np.float32), atlas.affine @ np.diag([2, 2, 2, 1.0]),
                  None, "x")
    blob = not_a_head(like, "blob", seed=0)
    path = save_volume(blob.array, tmp_path / "phantom.nii.gz", blob.affine)
    with pytest.raises(VolumeError, match=r"phantom\.nii\.gz.*NCC 0\.[0-4].*head MRI"):
        segmenters["affine"].segment_to_files(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


# ------------------------------------------------------------------------------ training

def write_raw_synthetic_dataset(root):
    """A SYNTHETIC pool as raw scans: the atlas SYN01 (LPS, 2 mm) as written, SYN02 and SYN03
    moved in the "scanner" and stored on 2 mm LIA grids as .mgz. Returns the unmoved images."""
    from ltnet_keras.data.synthetic import write_synthetic_dataset
    write_synthetic_dataset(root, n_subjects=3, shape=(40, 40, 40), max_displacement=2.0)
    unmoved = {}
    for number, (degrees, shift) in ((2, (7.0, (4.0, -3.0, 2.0))), (3, (5.0, (-3.0, 4.0, 5.0)))):
        sid = f"SYN{number:02d}"
        path = root / "images" / f"{sid}.nii.gz"
        image = load_image(path)
        image = Volume(image.array, np.diag([-2.0, -2.0, 2.0, 1.0]), None, str(path))
        unmoved[sid] = image
        move = HeadMove((0.2, 0.9, -0.4), degrees, shift, 1.03, tuple(
            (image.affine @ [19.5, 19.5, 19.5, 1.0])[:3])).matrix
        shape, affine = conformed_grid(image, (48, 48, 48), spacing=2.0)
        path.unlink()
        # Raw scans of an unlabelled pool: their label maps (still on the unmoved grid) go too.
        (root / "labels" / f"{sid}.nii.gz").unlink()
        save_volume(move_volume(image, move, shape, affine).array, root / "images" / f"{sid}.mgz",
                    affine)
    # the atlas gets the same 2 mm LPS grid
    for folder in ("images", "labels"):
        path = root / folder / "SYN01.nii.gz"
        array = np.asarray(nib.load(str(path)).dataobj)
        save_volume(array, path, np.diag([-2.0, -2.0, 2.0, 1.0]))
    return unmoved


def raw_config(root, steps=2):
    return config_from_dict({
        "name": "raw", "preset": "voxelmorph",
        "data": {"root": str(root), "atlas": "SYN01", "align": "affine",
                 "train_subjects": ["SYN01", "SYN02", "SYN03"], "val_subjects": ["SYN02"],
                 "crop_shape": [32, 32, 32], "factor": 2},
        "train": {"steps": steps, "log_every": 1, "checkpoint_every": 1, "seed": 0}})


def correlation(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_training_pool_is_aligned_to_the_atlas_once(tmp_path, monkeypatch):
    from ltnet_keras.data.dataset import load_training_data, prepare_volumes
    root = tmp_path / "data"
    unmoved = write_raw_synthetic_dataset(root)
    config = raw_config(root).data
    calls = []
    register = align.register_affine
    monkeypatch.setattr(align, "register_affine",
                        lambda *a, **k: calls.append(1) or register(*a, **k))
    data = load_training_data(config, cache_dir=tmp_path / "aligned")
    assert [t.subject for t in data.targets] == ["SYN02", "SYN03"] and len(calls) == 2
    for target in data.targets:
        assert target.image.shape == (16, 16, 16)
        # the aligned scan on the network grid is the unmoved scan there (the phantoms
        # differ from the atlas by a smooth warp only, which the affine leaves alone)
        truth = prepare_volumes(unmoved[target.subject], None, (32, 32, 32), 2).image
        assert correlation(target.image, truth) > 0.98
        assert (tmp_path / "aligned" / f"{target.subject}.nii.gz").exists()
    # the raw moved scan (cropped around its own brain) does not match: the test can fail
    from ltnet_keras.data.dataset import prepare_subject
    raw = prepare_subject(root / "images" / "SYN02.mgz", None, (32, 32, 32), 2).image
    assert correlation(raw, prepare_volumes(unmoved["SYN02"], None, (32, 32, 32), 2).image) < 0.95
    again = load_training_data(config, cache_dir=tmp_path / "aligned")
    assert len(calls) == 2      # read back from the cache, not registered again
    np.testing.assert_array_equal(again.targets[0].image, data.targets[0].image)
    # The pool's similarities, as the cache keeps them, set the run's check thresholds.
    from ltnet_keras.data.alignment_check import AlignmentChecker, AlignmentThresholds
    kept = {sid: json.loads((tmp_path / "aligned" / f"{sid}.json").read_text())["alignment"]
            for sid in ("SYN02", "SYN03")}
    assert all(k["start"] == "identity" and k["similarity"] > 0.8 for k in kept.values()), kept
    recorded = AlignmentChecker.for_run(tmp_path).thresholds    # reads <run>/aligned/
    assert recorded.pool == {sid: k["similarity"] for sid, k in kept.items()}
    assert recorded == AlignmentThresholds.from_pool(recorded.pool)
    assert recorded.refuse <= recorded.warn < min(recorded.pool.values())


@pytest.mark.slow
def test_a_folder_of_raw_scans_trains_and_segments(tmp_path):
    from ltnet_keras.inference.segment import Segmenter
    from ltnet_keras.training import train
    root = tmp_path / "data"
    write_raw_synthetic_dataset(root)
    run = tmp_path / "run"
    result = train(raw_config(root), run, verbose=0)
    assert result.steps_done == 2
    assert sorted(p.name for p in (run / "aligned").iterdir()) == [
        "SYN02.json", "SYN02.nii.gz", "SYN03.json", "SYN03.nii.gz", "alignment_check.json"]
    segmenter = Segmenter(run, alignment_cache=run / "aligned")
    assert segmenter.align == "affine"                     # the run's data.align
    segmentation = segmenter.segment(root / "images" / "SYN02.mgz")
    assert set(segmentation.seconds) >= {"registration_cached", "network"}
    scan = nib.load(str(root / "images" / "SYN02.mgz"))
    assert segmentation.labels.shape == scan.shape
    np.testing.assert_allclose(segmentation.affine, scan.affine)
    assert len(np.unique(segmentation.labels)) > 4        # the atlas' blobs reach the scan
