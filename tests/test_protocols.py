"""A label protocol other than LPBA40's, as FreeSurfer users have it: one folder per subject
(``sub-XX/brainmask.mgz`` + ``aseg.mgz``), label maps holding ids the protocol leaves out
(background, said once), and segmentations written as ``.mgz`` on the input's own grid."""

import ltnet_keras  # noqa: F401  (must precede TensorFlow)

import warnings

import nibabel as nib
import numpy as np
import pytest

from ltnet_keras import cli
from ltnet_keras.config import config_from_dict
from ltnet_keras.data.io import find_subjects, load_label_map, save_volume, subject_id
from ltnet_keras.data.synthetic import make_synthetic_subject, synthetic_label_table

# FreeSurfer's conformed orientation: voxel axes point Left, Inferior, Anterior.
LIA = np.array([[-1.0, 0, 0, 16], [0, 0, 1, -16], [0, -1, 0, 16], [0, 0, 0, 1]])
# aseg ids a protocol leaves out (choroid plexus, a corpus callosum segment): not in the table.
OUTSIDE = (31, 251)


def write_freesurfer_layout(root, n_subjects=3, shape=(32, 32, 32)):
    """``root/sub-0k/brainmask.mgz`` (uint8, as FreeSurfer writes it) and ``aseg.mgz`` whose
    maps hold two ids outside ``labels.tsv`` in a slab of the first structure."""
    root.mkdir(parents=True, exist_ok=True)
    table = synthetic_label_table(2)
    for k, child in enumerate(np.random.SeedSequence(7).spawn(n_subjects), start=1):
        image, labels = make_synthetic_subject(shape, child, n_pairs=2, max_displacement=1.0)
        first = np.argwhere(labels == 1)
        slab = first[:, 0] <= np.median(first[:, 0])
        labels[tuple(first[slab].T)] = OUTSIDE[k % 2]
        labels[0, 0, 0] = OUTSIDE[(k + 1) % 2]
        folder = root / f"sub-{k:02d}"
        save_volume(np.round(image * 200).astype(np.uint8), folder / "brainmask.mgz", LIA)
        save_volume(labels, folder / "aseg.mgz", LIA)
    rows = ["label\tname\tstructure"] + [f"{i}\t{n}\t{s}" for i, n, s in
                                         zip(table.ids.tolist(), table.names, table.structures)]
    (root / "labels.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def freesurfer_root(tmp_path_factory):
    return write_freesurfer_layout(tmp_path_factory.mktemp("fs") / "freesurfer")


def test_freesurfer_subject_folders_are_found_by_folder_name(freesurfer_root):
    subjects = find_subjects(freesurfer_root)
    assert list(subjects) == ["sub-01", "sub-02", "sub-03"]
    assert subjects["sub-02"].image.name == "brainmask.mgz"
    assert subjects["sub-02"].label.name == "aseg.mgz"
    assert subject_id(freesurfer_root / "sub-02" / "mri" / "aseg.mgz") == "sub-02"
    assert subject_id(freesurfer_root / "S01.nii.gz") == "S01"


@pytest.fixture(scope="module")
def protocol_run(freesurfer_root, tmp_path_factory):
    """Two steps of VoxelMorph with sub-01 as the atlas, its aseg holding ids outside the table."""
    from ltnet_keras.training import train
    config = config_from_dict({
        "name": "protocol", "preset": "voxelmorph",
        "data": {"root": str(freesurfer_root), "atlas": "sub-01",
                 "train_subjects": ["sub-01", "sub-02", "sub-03"], "val_subjects": ["sub-03"],
                 "crop_shape": [32, 32, 32], "factor": 2},
        "network": {"enc_features": [4] * 4, "dec_features": [4] * 7},
        "train": {"steps": 2, "log_every": 1, "checkpoint_every": 2, "seed": 0}})
    run = tmp_path_factory.mktemp("protocol") / "run"
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = train(config, run, verbose=0)
    return run, result, [str(w.message) for w in said]


def test_ids_outside_the_table_train_as_background_said_once(protocol_run, freesurfer_root):
    run, result, said = protocol_run
    atlas_aseg = freesurfer_root / "sub-01" / "aseg.mgz"
    about_atlas = [m for m in said if str(atlas_aseg) in m]
    assert len(about_atlas) == 1, said
    assert "[31, 251]" in about_atlas[0] and "background" in about_atlas[0]
    raw = result.data.atlas.grid.to_network(load_label_map(atlas_aseg).array, "label")
    outside = np.isin(raw, OUTSIDE)
    assert outside.sum() >= 5       # the slab reaches the network grid
    channels = np.argmax(result.data.atlas_one_hot, -1)
    assert np.all(channels[outside] == 0)
    assert np.all(channels[raw == 2] == 2)    # table ids keep their channels


def test_mgz_in_mgz_out_on_the_input_grid_with_table_ids_only(protocol_run, freesurfer_root,
                                                              tmp_path, capsys):
    run, _, _ = protocol_run
    scan = freesurfer_root / "sub-03" / "brainmask.mgz"
    code = cli.main(["segment", "--run", str(run), "--image", str(scan), "--out",
                     str(tmp_path), "--align", "none"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    written = tmp_path / "sub-03.mgz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub-03.mgz"]
    source, result = nib.load(str(scan)), nib.load(str(written))
    assert isinstance(result, nib.MGHImage)
    assert result.shape == source.shape
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-6)
    labels = np.asarray(result.dataobj)
    present = set(np.unique(labels).tolist())
    assert present - {0} and present <= {0, 1, 2, 3, 4}, present
    assert not present & set(OUTSIDE)


def test_table4_csv_keeps_method_names_with_commas_in_one_column():
    """"ANTs SyN, 1 atlas" once split into two columns and shifted the whole row."""
    import csv
    import io

    from ltnet_keras.evaluation import SubjectScores
    from ltnet_keras.study.protocol_table import Timed, protocol_csv
    from ltnet_keras.study.tables import PAPER_TABLE4
    row = Timed()
    row.add(SubjectScores("sub-01", labels={10: 0.5, 49: 0.7}, structures={"Thalamus-Proper": 0.6}),
            12.345)
    lines = list(csv.reader(io.StringIO(protocol_csv({"syn": row}, {"syn": "ANTs SyN, 1 atlas"}))))
    assert len(lines) == 2 and len(lines[1]) == len(lines[0]) == 4 + len(PAPER_TABLE4["structures"])
    record = dict(zip(lines[0], lines[1]))
    assert record["method"] == "ANTs SyN, 1 atlas" and record["subject"] == "sub-01"
    assert float(record["mean_label"]) == pytest.approx(0.6)
    assert float(record["Thalamus-Proper"]) == pytest.approx(0.6)
    assert record["seconds"] == "12.35" and record["Caudate"] == "nan"
