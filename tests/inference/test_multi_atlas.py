"""Several atlases for one scan: naming them in one line, ordering and fusing their maps."""
import numpy as np
import pytest

from ltnet_keras.data.errors import VolumeError
from ltnet_keras.inference.fusion import fuse_atlases, similarity_order
from ltnet_keras.inference.multi_atlas import atlas_files


def test_atlases_by_subject_id_or_image_labels_pair(lpba40_root, tmp_path):
    pairs = atlas_files(["S13", f"{lpba40_root}/images/S30.nii.gz:"
                                f"{lpba40_root}/labels/S30.nii.gz"], lpba40_root)
    assert pairs[0] == (str(lpba40_root / "images" / "S13.nii.gz"),
                        str(lpba40_root / "labels" / "S13.nii.gz"))
    assert pairs[1][1].endswith("labels/S30.nii.gz")
    with pytest.raises(ValueError, match="S99.*no subject of that id"):
        atlas_files(["S99"], lpba40_root)
    with pytest.raises(VolumeError, match="no such file"):
        atlas_files([f"{tmp_path}/a.nii.gz:{tmp_path}/b.nii.gz"], lpba40_root)
    with pytest.raises(ValueError, match="twice"):
        atlas_files(["S13", "S13"], lpba40_root)


def test_fusion_orders_atlases_by_similarity_and_breaks_ties_for_the_closest():
    rng = np.random.default_rng(0)
    target = rng.random((6, 6, 6))
    close, far = target + 0.05 * rng.random(target.shape), rng.random(target.shape)
    assert similarity_order([far, close], target) == [1, 0]
    # Two atlases disagree everywhere: a tie at every voxel, won by the closer atlas.
    far_labels, close_labels = np.full(target.shape, 1), np.full(target.shape, 2)
    fused = fuse_atlases([far_labels, close_labels], [far, close], target, "majority")
    np.testing.assert_array_equal(fused, close_labels)
    # Three atlases: the majority wins over the closest one.
    fused = fuse_atlases([far_labels, close_labels, far_labels], [far, close, far], target)
    np.testing.assert_array_equal(fused, far_labels)
    with pytest.raises(ValueError, match="valid: majority, jlf"):
        fuse_atlases([far_labels], [far], target, "staple")


@pytest.mark.slow
def test_segment_with_two_atlases_fused_by_jlf(lpba40_root, lpba40_table, tmp_path, capsys):
    from pathlib import Path

    from ltnet_keras import cli
    from ltnet_keras.data.io import load_label_map
    from ltnet_keras.evaluation import evaluate_pair
    run = Path(__file__).resolve().parents[2] / "results" / "recipe" / "voxelmorph"
    code = cli.main(["segment", "--run", str(run), "--align", "none", "--image",
                     str(lpba40_root / "images" / "S31.nii.gz"), "--out", str(tmp_path),
                     "--atlases", "S13", "S30", "--fusion", "jlf"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "fusion " in printed.out
    fused = load_label_map(tmp_path / "S31.nii.gz").array
    truth = load_label_map(lpba40_root / "labels" / "S31.nii.gz").array
    # One atlas (S13) gives this scan ~70 % with this run; two fused atlases do no worse.
    assert evaluate_pair(fused, truth, lpba40_table).mean_structure > 0.68
