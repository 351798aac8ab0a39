"""Whole-head scans: skull detection on heads and brains, head templates, brain extraction."""
from pathlib import Path

import numpy as np
import pytest

from ltnet_keras.data.errors import VolumeError
from ltnet_keras.data.io import Volume, load_image
from ltnet_keras.data.skull import (HEAD_MIN_ML, BrainFinder, HeadTemplate, check_skull_mode,
                                    extract_brain, find_head_templates, mask_dice,
                                    parse_head_template, skull_check)

FREESURFER = Path(__file__).resolve().parents[3] / "shared" / "data" / "freesurfer"


def ball(radius_mm, voxel=(1.0, 1.0, 1.0), shape=(64, 64, 64)):
    """A bright ball of ``radius_mm`` on a grid of ``voxel`` mm voxels."""
    axes = [(np.arange(n) - n / 2) * v for n, v in zip(shape, voxel)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    array = ((x ** 2 + y ** 2 + z ** 2) <= radius_mm ** 2).astype(np.float32) * 100
    return Volume(array, np.diag(list(voxel) + [1.0]), None, Path("ball.nii.gz"))


@pytest.mark.parametrize("voxel", [(1.0, 1.0, 1.0), (2.0, 1.5, 3.0)])
def test_foreground_volume_is_measured_in_millilitres_from_the_header(voxel):
    # 4/3 pi r^3 mL: r = 70 mm -> 1437 mL (a brain); r = 90 mm -> 3054 mL (a head)
    shape = tuple(int(220 / v) for v in voxel)
    for radius, has_skull in ((70, False), (90, True)):
        check = skull_check(ball(radius, voxel, shape))
        expected = 4 / 3 * np.pi * radius ** 3 / 1000.0
        assert check.foreground_ml == pytest.approx(expected, rel=0.03)
        assert check.has_skull is has_skull
        assert (check.foreground_ml >= HEAD_MIN_ML) is has_skull


def test_dark_background_noise_and_holes_do_not_change_the_verdict():
    volume = ball(70, shape=(160, 160, 160))
    rng = np.random.default_rng(0)
    noisy = volume.array + rng.uniform(0, 5, volume.shape).astype(np.float32)  # < 10 % of 99th
    noisy[30:34, 30:34, 30:34] = 0    # a dark hole inside (a ventricle) is filled
    check = skull_check(Volume(noisy, volume.affine, None, volume.path))
    assert not check.has_skull
    assert check.foreground_ml == pytest.approx(4 / 3 * np.pi * 70 ** 3 / 1000.0, rel=0.03)


@pytest.mark.slow
def test_skull_detection_on_real_heads_and_brains(lpba40_root):
    if not FREESURFER.is_dir():
        pytest.skip("FreeSurfer data not found")
    heads = sorted(FREESURFER.glob("sub-0*/T1.mgz"))
    brains = sorted(FREESURFER.glob("sub-0*/brainmask.mgz")) + [lpba40_root / "images" /
                                                                 "S11.nii.gz"]
    assert len(heads) == 4 and len(brains) == 6
    assert all(skull_check(load_image(p)).has_skull for p in heads)
    assert not any(skull_check(load_image(p)).has_skull for p in brains)


def test_head_templates_found_in_subject_folders_and_never_used_for_their_own_scan(tmp_path):
    for name, files in (("sub-a", ("T1.mgz", "brainmask.mgz")), ("sub-b", ("brainmask.mgz",)),
                        ("sub-c/mri", ("T1.mgz", "brainmask.mgz"))):
        (tmp_path / name).mkdir(parents=True)
        for f in files:
            (tmp_path / name / f).write_bytes(b"x")
    found = find_head_templates([tmp_path, tmp_path / "missing"])
    assert [t.name for t in found] == ["sub-a/T1.mgz", "mri/T1.mgz"]
    assert found[0].is_for(tmp_path / "sub-a" / "T1.mgz")
    assert found[0].is_for(tmp_path / "sub-a" / "other.nii.gz")
    assert not found[0].is_for(tmp_path / "sub-c" / "mri" / "T1.mgz")
    template = parse_head_template(f"{found[0].image}:{found[0].mask}")
    assert template == HeadTemplate(found[0].image, found[0].mask)
    with pytest.raises(ValueError, match="IMAGE:MASK"):
        parse_head_template(str(found[0].image))
    with pytest.raises(VolumeError, match="not found"):
        parse_head_template(f"{found[0].image}:{tmp_path / 'nope.mgz'}")
    with pytest.raises(ValueError, match="auto, on, off"):
        check_skull_mode("maybe")


def test_a_head_with_no_usable_template_is_refused_naming_the_scan(tmp_path):
    from ltnet_keras.data.io import save_volume
    head = ball(90, shape=(200, 200, 200))
    path = save_volume(head.array, tmp_path / "T1.nii.gz", head.affine)
    own = HeadTemplate(tmp_path / "T1.nii.gz", tmp_path / "brainmask.nii.gz")
    with pytest.raises(VolumeError, match=r"T1.nii.gz.*skull on .* no head template"):
        BrainFinder("auto", [own]).read(path)
    volume, extraction = BrainFinder("off", [own]).read(path)
    assert extraction is None and np.array_equal(volume.array, head.array)


def test_mask_dice():
    a = np.zeros((4, 4, 4), bool)
    b = a.copy()
    a[:2], b[1:3] = True, True
    assert mask_dice(a, b) == pytest.approx(0.5)
    assert mask_dice(np.zeros(3), np.zeros(3)) == 1.0


@pytest.mark.slow
def test_brain_extraction_of_a_real_head_matches_freesurfers_brainmask():
    if not (FREESURFER / "sub-03" / "T1.mgz").exists():
        pytest.skip("FreeSurfer whole-head data not found")
    templates = find_head_templates([FREESURFER])
    scan = load_image(FREESURFER / "sub-03" / "T1.mgz")
    extraction = extract_brain(scan, templates)
    assert extraction.templates == ["sub-01/T1.mgz"]          # not sub-03's own
    truth = load_image(FREESURFER / "sub-03" / "brainmask.mgz").array > 0
    assert mask_dice(extraction.mask, truth) > 0.93
    assert np.all(extraction.brain.array[~extraction.mask] == 0)
    assert not skull_check(extraction.brain).has_skull


def test_a_batch_extracts_each_brain_once_and_a_changed_file_again(tmp_path, monkeypatch):
    from ltnet_keras.data import skull
    from ltnet_keras.data.io import save_volume
    calls = []

    def fake_extract(scan, templates, settings=None, check=None):
        calls.append(scan.path)
        mask = np.zeros(scan.shape, bool)
        mask[60:140, 60:140, 60:140] = True
        brain = Volume(np.where(mask, scan.array, 0), scan.affine, None, scan.path)
        return skull.BrainExtraction(mask, brain, ["t/T1.mgz"], check, {"brain_extraction": 1.0})
    monkeypatch.setattr(skull, "extract_brain", fake_extract)
    head = ball(90, shape=(200, 200, 200))
    paths = [save_volume(head.array, tmp_path / f"{n}.nii.gz", head.affine) for n in "ab"]
    finder = BrainFinder("auto", [])
    first = [finder.read(p) for p in paths]          # checking the batch
    again = [finder.read(p) for p in paths]          # segmenting it
    assert len(calls) == 2
    for (brain, extraction), (brain2, extraction2) in zip(first, again):
        assert np.array_equal(brain.array, brain2.array)
        assert np.array_equal(extraction.mask, extraction2.mask)
        assert extraction2.templates == ["t/T1.mgz"]
    import os
    os.utime(paths[0], ns=(1, 1))                    # the file changed: extracted again
    finder.read(paths[0])
    assert len(calls) == 3
