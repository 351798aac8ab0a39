"""Loading, checking and atomic writing of volumes (ltnet_keras.data.io)."""
import gzip

import nibabel as nib
import numpy as np
import pytest

from ltnet_keras.data import io
from ltnet_keras.data.io import VolumeError
from ltnet_keras.data.labels import LabelTable

AFFINE = np.array([[-1.0, 0, 0, 10], [0, -1, 0, 20], [0, 0, 1.5, -5], [0, 0, 0, 1]])
SUBJECTS = ("S01", "S11", "S12")


def _labels(shape=(8, 9, 10)):
    labels = np.zeros(shape, dtype=np.int32)
    labels[2:5, 3:6, 4:8] = 21
    labels[5:7, 3:6, 4:8] = 22
    return labels


def _image(shape=(8, 9, 10), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _nifti(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _raises(path, *words, call=io.load_image, **kwargs):
    with pytest.raises(VolumeError) as caught:
        call(path, **kwargs)
    message = str(caught.value)
    assert message.startswith(str(path)), message
    for word in words:
        assert word in message, message
    return message


# --- real data --------------------------------------------------------------------------------

@pytest.mark.parametrize("sid", SUBJECTS)
def test_real_subject_loads(lpba40_root, lpba40_table, sid):
    image, label = io.load_subject(lpba40_root / "images" / f"{sid}.nii.gz",
                                   lpba40_root / "labels" / f"{sid}.nii.gz", lpba40_table)
    assert image.array.shape == label.array.shape == (160, 192, 160)
    assert image.array.dtype == np.float32 and label.array.dtype == np.int32
    assert 0.0 <= image.array.min() and image.array.max() <= 1.0
    assert image.array.max() > 0.9
    ids = set(np.unique(label.array).tolist()) - {0}
    assert ids == set(lpba40_table.ids.tolist())
    np.testing.assert_allclose(image.affine, label.affine)
    assert image.affine.shape == (4, 4) and image.header is not None


def test_find_subjects_on_real_data(lpba40_root):
    subjects = io.find_subjects(lpba40_root)
    assert list(subjects)[:3] == list(SUBJECTS)
    assert len(subjects) == 31
    assert all(s.label is not None and s.label.name == s.image.name for s in subjects.values())


# --- formats ----------------------------------------------------------------------------------

def test_nifti_4d_singleton_is_squeezed(tmp_path):
    path = _nifti(tmp_path / "a.nii", _image()[..., None])
    volume = io.load_image(path)
    assert volume.array.shape == (8, 9, 10)
    np.testing.assert_allclose(volume.affine, AFFINE)


def test_npz_round_trip(tmp_path):
    image, labels = _image(), _labels()
    np.savez(tmp_path / "s.npz", vol=image.astype(np.float64), seg=labels.astype(np.uint8),
             affine=AFFINE)
    np.savez(tmp_path / "plain.npz", vol=image)
    vol = io.load_image(tmp_path / "s.npz")
    seg = io.load_label_map(tmp_path / "s.npz")
    assert vol.array.dtype == np.float32 and seg.array.dtype == np.int32
    np.testing.assert_array_equal(vol.array, image)
    np.testing.assert_array_equal(seg.array, labels)
    np.testing.assert_allclose(vol.affine, AFFINE)
    assert vol.header is None
    np.testing.assert_allclose(io.load_image(tmp_path / "plain.npz").affine, np.eye(4))
    _raises(tmp_path / "plain.npz", "no 'seg' array", call=io.load_label_map)


def test_mgz_round_trip(tmp_path):
    image, labels = _image(), _labels()
    nib.save(nib.MGHImage(image, AFFINE), str(tmp_path / "img.mgz"))
    nib.save(nib.MGHImage(labels, AFFINE), str(tmp_path / "seg.mgz"))
    vol, seg = io.load_subject(tmp_path / "img.mgz", tmp_path / "seg.mgz")
    np.testing.assert_array_equal(vol.array, image)
    np.testing.assert_array_equal(seg.array, labels)
    np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-5)
    # written back through save_volume as .mgz and as NIfTI (the MGH header is not reused there)
    for name in ("again.mgz", "again.nii.gz"):
        io.save_volume(seg.array, tmp_path / name, seg.affine, seg.header)
        again = io.load_label_map(tmp_path / name)
        np.testing.assert_array_equal(again.array, labels)
        np.testing.assert_allclose(again.affine, AFFINE, atol=1e-5)


def test_subject_id_and_find_subjects(tmp_path):
    assert io.subject_id("/a/b/S01.nii.gz") == "S01"
    assert io.subject_id("S02.nii") == "S02"
    assert io.subject_id("x.y.mgz") == "x.y"
    assert io.subject_id("S03.npz") == "S03"
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for sid in ("b", "a"):
        _nifti(tmp_path / "images" / f"{sid}.nii.gz", _image())
    _nifti(tmp_path / "labels" / "a.mgz", _labels())
    (tmp_path / "images" / "notes.txt").write_text("ignored")
    subjects = io.find_subjects(tmp_path)
    assert list(subjects) == ["a", "b"]
    assert subjects["a"].label.name == "a.mgz" and subjects["b"].label is None
    _raises(tmp_path / "missing", "not found", call=io.find_subjects)
    with pytest.raises(VolumeError, match="folder of images not found"):
        io.find_subjects(tmp_path / "labels")


# --- save_volume ------------------------------------------------------------------------------

def test_save_volume_keeps_affine_header_and_dtype(tmp_path):
    image = _image()
    source = _nifti(tmp_path / "src.nii.gz", image)
    volume = io.load_image(source)
    volume.header["descrip"] = b"ltnet test"
    out = io.save_volume(volume.array, tmp_path / "out" / "copy.nii.gz", volume.affine,
                         volume.header)
    loaded = nib.load(str(out))
    np.testing.assert_allclose(loaded.affine, AFFINE)
    assert loaded.header["descrip"].tobytes().startswith(b"ltnet test")
    assert loaded.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asanyarray(loaded.dataobj), image)
    for values, dtype in (([0, 255], np.uint8), ([-3, 300], np.int16), ([0, 70000], np.int32)):
        array = np.zeros((4, 4, 4), dtype=np.int64)
        array.flat[:2] = values
        path = io.save_volume(array, tmp_path / f"{dtype.__name__}.nii", AFFINE)
        assert nib.load(str(path)).get_data_dtype() == dtype
        np.testing.assert_array_equal(io.load_label_map(path).array, array)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "int16.nii", "int32.nii", "out", "src.nii.gz", "uint8.nii"]


def test_save_volume_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "seg.nii.gz"
    io.save_volume(_labels(), target, AFFINE)
    before = target.read_bytes()

    def failing_write(image, filename, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(gzip.compress(b"half a volume")[:10])
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", failing_write)
    with pytest.raises(OSError, match="disk full"):
        io.save_volume(_labels() * 2, target, AFFINE)
    with pytest.raises(OSError, match="disk full"):
        io.save_volume(_labels(), tmp_path / "new.nii.gz", AFFINE)
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]
    assert target.read_bytes() == before


def test_save_volume_rejects_bad_arguments(tmp_path):
    def save(array, affine=AFFINE):
        return lambda path: io.save_volume(array, path, affine)

    _raises(tmp_path / "x.npz", "cannot write", call=save(_image()))
    _raises(tmp_path / "x.nii", "affine must be 4x4", call=save(_image(), np.eye(3)))
    _raises(tmp_path / "x.nii", "3D or 4D", call=save(np.zeros((3, 3))))
    assert list(tmp_path.iterdir()) == []


# --- bad inputs -------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    _raises(tmp_path / "nope.nii.gz", "file not found")
    _raises(tmp_path / "nope.npz", "file not found", call=io.load_label_map)


def test_truncated_gzip(tmp_path):
    whole = _nifti(tmp_path / "whole.nii.gz", _image((20, 20, 20))).read_bytes()
    for cut in (len(whole) // 2, 200, 30):
        path = tmp_path / f"cut{cut}.nii.gz"
        path.write_bytes(whole[:cut])
        _raises(path, "truncated, corrupt or not a NIfTI image")


def test_non_image_files(tmp_path):
    (tmp_path / "text.nii.gz").write_text("this is not an image\n")
    _raises(tmp_path / "text.nii.gz", "not a NIfTI image")
    (tmp_path / "text.nii").write_text("this is not an image\n" * 50)
    _raises(tmp_path / "text.nii", "not a NIfTI image")
    (tmp_path / "text.mgz").write_text("nope")
    _raises(tmp_path / "text.mgz", "not a FreeSurfer .mgz image")
    (tmp_path / "text.npz").write_text("nope")
    _raises(tmp_path / "text.npz", "not a numpy .npz archive")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    _raises(tmp_path / "image.png", "unsupported file type")


def test_not_3d(tmp_path):
    _raises(_nifti(tmp_path / "2d.nii", np.ones((5, 6), np.float32)), "expected a 3D volume")
    _raises(_nifti(tmp_path / "4d.nii", np.ones((5, 6, 7, 2), np.float32)), "expected a 3D volume",
            "(5, 6, 7, 2)")


def test_nan_and_inf_image(tmp_path):
    image = _image()
    image[1, 1, 1] = np.nan
    image[2, 2, 2] = np.inf
    _raises(_nifti(tmp_path / "nan.nii.gz", image), "2 NaN or infinite voxel")


def test_non_integral_label_map(tmp_path):
    labels = _labels().astype(np.float32)
    labels[3, 4, 5] = 1.5
    _raises(_nifti(tmp_path / "float.nii.gz", labels), "non-integer", "1.5", call=io.load_label_map)
    # integral floats are fine
    assert io.load_label_map(_nifti(tmp_path / "ok.nii.gz", _labels().astype(np.float32))
                             ).array.dtype == np.int32


def test_empty_label_map(tmp_path):
    _raises(_nifti(tmp_path / "empty.nii.gz", np.zeros((4, 5, 6), np.uint8)), "label map is empty",
            call=io.load_label_map)


def test_shape_mismatch(tmp_path):
    image = _nifti(tmp_path / "img.nii.gz", _image((8, 9, 10)))
    labels = _nifti(tmp_path / "seg.nii.gz", _labels((8, 9, 11)))
    message = _raises(labels, "(8, 9, 11) does not match the image shape (8, 9, 10)",
                      call=lambda p: io.load_subject(image, p))
    assert str(image) in message


def test_affine_mismatch(tmp_path):
    image = _nifti(tmp_path / "img.nii.gz", _image())
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.0
    labels = _nifti(tmp_path / "seg.nii.gz", _labels(), affine=shifted)
    _raises(labels, "affine differs", call=lambda p: io.load_subject(image, p))
    nearly = AFFINE.copy()
    nearly[0, 3] += 1e-5
    _nifti(tmp_path / "near.nii.gz", _labels(), affine=nearly)
    assert io.load_subject(image, tmp_path / "near.nii.gz")[1] is not None


def test_unknown_label_ids_are_background_said_once(tmp_path):
    image = _nifti(tmp_path / "img.nii.gz", _image())
    labels = _labels()
    labels[0, 0, 0] = 99
    labels[1, 0, 0] = 99
    path = _nifti(tmp_path / "seg.nii.gz", labels)
    table = LabelTable.from_ids([21, 22])
    with pytest.warns(UserWarning, match=r"label ids \[99\] are not in the label table: their 2 "
                                         "voxels are background"):
        restricted = io.load_subject(image, path, table)[1].array
    assert restricted[0, 0, 0] == 0 and restricted[1, 0, 0] == 0
    np.testing.assert_array_equal(restricted[2:], labels[2:])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # the same file again: not said twice
        io.load_subject(image, path, table)
    assert io.load_subject(image, path, LabelTable.from_ids([21, 22, 99]))[1].array.max() == 99


def test_label_map_with_no_id_of_the_table_is_refused(tmp_path):
    image = _nifti(tmp_path / "img.nii.gz", _image())
    path = _nifti(tmp_path / "seg.nii.gz", _labels())
    _raises(path, "none of the map's ids is in the table",
            call=lambda p: io.load_subject(image, p, LabelTable.from_ids([7, 8])))