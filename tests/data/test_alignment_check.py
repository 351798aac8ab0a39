"""Alignment that does not fail silently: half-turned headers are aligned from the half turn,
every alignment carries its similarity to the atlas (kept by the cache), a training pool sets
the thresholds, and the check warns or refuses by name."""
import json
import os

import ltnet_keras  # noqa: F401  (must precede TensorFlow)

import numpy as np
import pytest

from ltnet_keras.data import align
from ltnet_keras.data.align import Alignment, AlignmentCache, RegistrationSettings
from ltnet_keras.data.alignment_check import (CHECK_FILE, AlignmentChecker, AlignmentThresholds,
                                              alignment_similarity, check_similarity,
                                              half_turned_header, not_a_head)
from ltnet_keras.data.errors import VolumeError
from ltnet_keras.data.grids import axis_codes, registration_image
from ltnet_keras.data.io import Volume, load_image, save_volume

# A cheap registration of 2 mm LPBA40 volumes: a 4 mm grid and fewer iterations.
QUICK = RegistrationSettings(spacing=4.0, iterations=(60, 15), shrink_factors=(2, 1),
                             smoothing_sigmas=(1, 0))


@pytest.fixture(scope="module")
def lpba40_2mm(lpba40_root):
    """S01 (the atlas) and S11 on 2 mm grids (block means of the 1 mm scans)."""
    def at_2mm(sid):
        volume = load_image(lpba40_root / "images" / f"{sid}.nii.gz")
        coarse = registration_image(volume, axis_codes(volume.affine), 2.0)
        return Volume(coarse.array, coarse.affine, None, f"{sid}.nii.gz")
    return at_2mm("S01"), at_2mm("S11")


@pytest.fixture(scope="module")
def unturned(lpba40_2mm):
    atlas, scan = lpba40_2mm
    return align.register_affine(scan, atlas, QUICK)


def brain_voxel_distance(a: Alignment, b: Alignment, scan: Volume) -> np.ndarray:
    """Distances (atlas voxels, 2 mm) between where two alignments send the scan's brain."""
    voxels = np.argwhere(scan.array > 0.2)[::50]
    points = np.c_[voxels, np.ones(len(voxels))]
    difference = points @ (a.scan_voxel_to_atlas_voxel - b.scan_voxel_to_atlas_voxel).T
    return np.linalg.norm(difference[:, :3], axis=1)


@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_a_half_turned_header_is_aligned_from_the_half_turn(lpba40_2mm, unturned, axis):
    """Same voxels, a header turned 180 degrees about ``axis``: the start search finds the turn
    and the alignment sends every voxel where the unturned scan's alignment sends it."""
    atlas, scan = lpba40_2mm
    assert unturned.start == "identity" and unturned.similarity > 0.7
    turned = half_turned_header(scan, axis)
    assert not np.allclose(turned.affine, scan.affine)
    alignment = align.register_affine(turned, atlas, QUICK)
    assert alignment.start == axis, alignment.start_scores
    assert abs(alignment.similarity - unturned.similarity) < 0.03
    # registration noise at a 4 mm grid, from two starts: a few mm at most
    distance = brain_voxel_distance(alignment, unturned, scan)
    assert distance.mean() < 1.0 and distance.max() < 3.0, (distance.mean(), distance.max())


def test_without_the_start_search_a_half_turn_fails_and_the_similarity_shows_it(lpba40_2mm,
                                                                                unturned):
    """The old path (ANTs' start only) settles back to front on LPBA40's old header (a half
    turn about z): far from the right alignment, and its similarity is below the refusal."""
    atlas, scan = lpba40_2mm
    alignment = align.register_affine(half_turned_header(scan, "z"), atlas, QUICK,
                                      search_start=False)
    assert alignment.start == "identity" and alignment.start_scores == {}
    assert brain_voxel_distance(alignment, unturned, scan).mean() > 20
    assert alignment.similarity < AlignmentThresholds().refuse < unturned.similarity


def test_a_cube_phantom_aligns_with_a_similarity_below_the_refusal(lpba40_2mm, unturned):
    atlas, scan = lpba40_2mm
    cube = align.register_affine(not_a_head(scan, "cube"), atlas, QUICK)
    assert cube.similarity < AlignmentThresholds().refuse < unturned.similarity


def test_not_a_head_phantoms_are_checked():
    like = Volume(np.zeros((20, 24, 20), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), None, "x")
    blob, cube = not_a_head(like, "blob", 3), not_a_head(like, "cube")
    assert blob.shape == cube.shape == like.shape and blob.array.max() == cube.array.max() == 1
    assert not np.allclose(blob.array, not_a_head(like, "blob", 4).array)    # seeded noise
    with pytest.raises(ValueError, match="'blob' or 'cube'"):
        not_a_head(like, "sphere")


# ------------------------------------------------------------------------------ the cache

def small_pair(tmp_path):
    rng = np.random.default_rng(0)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    image = np.zeros((12, 12, 12), np.float32)
    image[2:10, 2:10, 2:10] = rng.random((8, 8, 8)) + 0.5
    atlas = Volume(image, affine, None, str(tmp_path / "atlas.nii.gz"))
    save_volume(image, atlas.path, affine)
    scan_path = tmp_path / "S1.nii.gz"
    save_volume(image + 0.1 * rng.random(image.shape).astype(np.float32), scan_path, affine)
    return atlas, scan_path


def test_the_similarity_is_kept_by_the_cache_and_filled_in_for_old_records(tmp_path,
                                                                           monkeypatch):
    atlas, scan_path = small_pair(tmp_path)
    calls = []

    def fake_register(scan, atlas, settings=None):
        calls.append(1)
        alignment = Alignment.identity(scan, atlas.shape, atlas.affine)
        alignment.similarity, alignment.start = 0.42, "z"
        alignment.start_scores = {"identity": 0.3, "x": 0.2, "y": 0.1, "z": 0.5}
        return alignment

    monkeypatch.setattr(align, "register_affine", fake_register)
    scan = load_image(scan_path)
    AlignmentCache(tmp_path / "aligned").alignment(scan, atlas)
    again = AlignmentCache(tmp_path / "aligned").alignment(scan, atlas)   # a new process
    assert len(calls) == 1
    assert (again.similarity, again.start, again.start_scores["z"]) == (0.42, "z", 0.5)
    # A record written before similarities were kept: read back, given one, and kept.
    record_path = tmp_path / "aligned" / "S1.json"
    record = json.loads(record_path.read_text())
    for key in ("similarity", "start", "start_scores"):
        del record["alignment"][key]
    record_path.write_text(json.dumps(record))
    old = AlignmentCache(tmp_path / "aligned").alignment(scan, atlas)
    assert len(calls) == 1 and old.start == "identity"
    assert old.similarity == pytest.approx(alignment_similarity(scan, atlas, np.eye(4)))
    assert old.similarity > 0.9                      # the scan is the atlas plus 10 % noise
    kept = json.loads(record_path.read_text())["alignment"]
    assert kept["similarity"] == pytest.approx(old.similarity)


# ------------------------------------------------------------------------------ thresholds

def test_thresholds_from_a_pool():
    pool = {f"S{i}": v for i, v in enumerate([0.74, 0.76, 0.77, 0.78, 0.79, 0.80])}
    thresholds = AlignmentThresholds.from_pool(pool)
    assert thresholds.pool == pool
    assert thresholds.refuse <= thresholds.warn < min(pool.values())
    # One poor scan in the pool pulls the warning down with it, never above the pool.
    lowered = AlignmentThresholds.from_pool({**pool, "bad": 0.45})
    assert lowered.warn < 0.45 and lowered.refuse <= lowered.warn
    with pytest.raises(ValueError, match="finite"):
        AlignmentThresholds.from_pool({"S1": float("nan")})


def test_thresholds_are_written_and_read_beside_the_pool(tmp_path):
    assert AlignmentThresholds.read(tmp_path) == AlignmentThresholds()     # none: defaults
    kept = AlignmentThresholds.from_pool({"S1": 0.7, "S2": 0.8})
    kept.write(tmp_path / "aligned")
    assert AlignmentChecker.for_run(tmp_path).thresholds == kept
    (tmp_path / "aligned" / CHECK_FILE).write_text("{not json")
    with pytest.raises(VolumeError, match="alignment_check.json.*unreadable"):
        AlignmentThresholds.read(tmp_path / "aligned")


def test_check_refuses_warns_or_lets_pass_by_mode():
    thresholds = AlignmentThresholds(warn=0.65, refuse=0.6, pool={"S1": 0.7, "S2": 0.8})
    with pytest.raises(VolumeError, match=r"blob\.mgz.*NCC 0\.05 \(the 2 training scans had "
                                          r"0\.70-0\.80.*head MRI.*orientation"):
        check_similarity("/data/blob.mgz", 0.05, thresholds, "refuse")
    assert "NCC 0.05" in check_similarity("/data/blob.mgz", 0.05, thresholds, "warn")
    assert "NCC 0.62" in check_similarity("/data/a.mgz", 0.62, thresholds, "refuse")
    assert check_similarity("/data/a.mgz", 0.66, thresholds, "refuse") is None
    assert check_similarity("/data/blob.mgz", 0.05, thresholds, "off") is None
    with pytest.raises(ValueError, match="refuse, warn, off"):
        check_similarity("/data/a.mgz", 0.7, thresholds, "strict")


def test_checker_aligns_each_file_once_and_reports_by_name(tmp_path):
    scan_path = tmp_path / "S1.nii.gz"
    save_volume(np.ones((4, 4, 4), np.float32), scan_path, np.eye(4))
    reports, calls = [], []

    def aligned(similarity, start="identity"):
        def align_now():
            calls.append(1)
            alignment = Alignment(np.eye(4), (4, 4, 4), np.eye(4), (4, 4, 4), np.eye(4))
            alignment.similarity, alignment.start = similarity, start
            return alignment
        return align_now

    checker = AlignmentChecker(AlignmentThresholds(warn=0.65, refuse=0.6), "refuse",
                               reports.append)
    first = checker.checked(str(scan_path), aligned(0.62, "y"))
    assert checker.checked(str(scan_path), aligned(0.9)) is first and len(calls) == 1
    assert len(reports) == 2 and all(r.startswith(str(scan_path)) for r in reports)
    assert "half a turn about the y axis" in reports[0] and "NCC 0.62" in reports[1]
    os.utime(scan_path, ns=(1, 1))                    # the file changed: aligned again
    with pytest.raises(VolumeError, match="S1.nii.gz"):
        checker.checked(str(scan_path), aligned(0.1))
    assert len(calls) == 2


def test_segment_command_has_an_alignment_check_option():
    from ltnet_keras.cli import build_parser
    base = ["segment", "--run", "r", "--image", "a.mgz", "--out", "o"]
    assert build_parser().parse_args(base).alignment_check == "refuse"
    assert build_parser().parse_args(base + ["--alignment-check", "off"]).alignment_check == "off"
    with pytest.raises(SystemExit):
        build_parser().parse_args(base + ["--alignment-check", "maybe"])
