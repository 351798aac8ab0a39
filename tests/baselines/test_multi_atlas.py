"""Multi-atlas segmentation (Table 3): majority vote, joint label fusion, ANTs SyN of atlases
to targets, the registration and row caches, and the Table 3 script end to end."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from ltnet_keras import evaluation
from ltnet_keras.baselines import syn
from ltnet_keras.inference import fusion
from ltnet_keras.config import DataConfig
from ltnet_keras.data.io import Volume, find_subjects
from ltnet_keras.data.synthetic import (make_synthetic_subject, synthetic_label_table,
                                        write_synthetic_dataset)
from ltnet_keras.inference.fusion import JointFusionSettings, joint_label_fusion, majority_vote
from ltnet_keras.baselines.multi_atlas import (RegistrationCache, SynSettings, ants_multi_atlas,
                                     ranked_atlases, register_atlas)

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
# 40^3 phantoms register in well under a second at 1 mm. (Coarser grids leave ANTs' 4x
# shrunk affine level a handful of voxels: real scans at 3 mm have 13x16x13 there.)
QUICK_SYN = SynSettings(spacing=1.0, iterations=(40, 20, 0))


def _dice(pred, truth, table) -> float:
    return evaluation.evaluate_pair(pred, truth, table).mean_structure


# ----------------------------------------------------------------------------- majority vote

def test_majority_vote_by_hand_with_its_tie_rule():
    a = np.array([3, 3, 0, 5, 1, 2])
    b = np.array([3, 4, 4, 6, 2, 2])
    c = np.array([4, 4, 0, 7, 3, 9])
    # 3,3,4 -> 3 | 3,4,4 -> 4 | 0,4,0 -> 0 | 5,6,7 three-way tie -> first map | 1,2,3 -> first
    # | 2,2,9 -> 2
    np.testing.assert_array_equal(majority_vote([a, b, c]), [3, 4, 0, 5, 1, 2])
    np.testing.assert_array_equal(majority_vote([c, b, a]), [3, 4, 0, 7, 3, 2])
    # Two against two: the label of the earliest map among the tied ones.
    maps = [np.array([1, 2]), np.array([2, 1]), np.array([2, 1]), np.array([1, 2])]
    np.testing.assert_array_equal(majority_vote(maps), [1, 2])
    # Two maps: every disagreement is a tie, so the first map comes back.
    np.testing.assert_array_equal(majority_vote([b, c]), b)
    with pytest.raises(ValueError, match="at least one"):
        majority_vote([])
    with pytest.raises(ValueError, match="share one shape"):
        majority_vote([np.zeros((2, 2)), np.zeros((2, 3))])


def _reference_vote(maps):
    """Voxel by voxel: the label most maps carry; among tied labels, the earliest map's."""
    flat = [np.asarray(m).reshape(-1) for m in maps]
    out = []
    for voxel in range(flat[0].size):
        votes = [int(m[voxel]) for m in flat]
        most = max(votes.count(v) for v in votes)
        out.append(next(v for v in votes if votes.count(v) == most))
    return np.array(out).reshape(np.shape(maps[0]))


@pytest.mark.parametrize("n_maps", [1, 2, 3, 4, 5, 7])
def test_majority_vote_equals_a_voxel_by_voxel_reference_with_many_ties(n_maps, monkeypatch):
    rng = np.random.default_rng(n_maps)
    ids = np.array([0, 2, 17, 41, 1035, 2035])   # FreeSurfer-like, not contiguous
    shape = (9, 10, 11)
    # A unanimous background block, a unanimous label block, and a disagreeing rest drawn
    # from 2-3 labels per voxel so that ties are common.
    base = ids[rng.integers(0, len(ids), shape)]
    maps = []
    for k in range(n_maps):
        m = np.where(rng.random(shape) < 0.5, base, ids[rng.integers(0, 3, shape)])
        m[:3] = 0
        m[3:5] = 17
        maps.append(m.astype(np.int32))
    expected = _reference_vote(maps)
    fused = majority_vote(maps)
    np.testing.assert_array_equal(fused, expected)
    assert fused.dtype == np.int32 and fused.shape == shape
    if n_maps >= 2:   # the case must have had ties where the first map loses and wins
        flat = np.stack([m.reshape(-1) for m in maps])
        disagree = (flat != flat[0]).any(axis=0)
        assert disagree.sum() > 100 and (fused.reshape(-1)[disagree] != flat[0][disagree]).any() \
            == (n_maps >= 3)
    # Any memory layout and mixed integer dtypes give the same labels (the common dtype).
    mixed = [np.asfortranarray(m) if k % 2 else m.astype(np.uint16)
             for k, m in enumerate(maps)]
    again = majority_vote(mixed)
    np.testing.assert_array_equal(again, expected)
    assert again.dtype == np.result_type(*mixed)
    assert not any(np.shares_memory(again, m) for m in mixed)
    fortran = [np.asfortranarray(m) for m in maps]
    np.testing.assert_array_equal(majority_vote(fortran), expected)
    # Voted block by block (blocks of a size that does not divide the grid): the same.
    from ltnet_keras.inference import fusion
    monkeypatch.setattr(fusion, "VOTE_BLOCK", 97)
    np.testing.assert_array_equal(majority_vote(maps), expected)
    np.testing.assert_array_equal(majority_vote(fortran), expected)


# ----------------------------------------------------------------------------- joint label fusion

@pytest.fixture(scope="module")
def phantoms():
    """Three atlases and a target: one template, each deformed by its own smooth field."""
    subjects = [make_synthetic_subject((28, 28, 28), seed=s, n_pairs=4, max_displacement=3.0)
                for s in (1, 2, 3, 4)]
    return subjects[:3], subjects[3], synthetic_label_table(4)


def test_fusing_identical_atlases_returns_their_labels(phantoms):
    image, labels = phantoms[0][0]
    copies = [labels.copy() for _ in range(3)]
    np.testing.assert_array_equal(majority_vote(copies), labels)
    np.testing.assert_array_equal(joint_label_fusion(image, [image] * 3, copies), labels)
    # ANTs over the whole image, background included, gives the same labels.
    everywhere = JointFusionSettings(restrict_to_disagreement=False)
    np.testing.assert_array_equal(
        joint_label_fusion(image, [image] * 3, copies, settings=everywhere), labels)


def test_jlf_follows_the_atlas_that_looks_like_the_target(phantoms):
    (image_a, labels_a), (image_b, labels_b) = phantoms[0][:2]
    table = phantoms[2]
    # The target is atlas B's scan; atlas A comes first, so the vote of two maps returns A.
    voted = majority_vote([labels_a, labels_b])
    fused = joint_label_fusion(image_b, [image_a, image_b], [labels_a, labels_b])
    np.testing.assert_array_equal(voted, labels_a)
    assert _dice(labels_a, labels_b, table) < 0.8
    assert _dice(fused, labels_b, table) > 0.97


@pytest.mark.parametrize("patch, search", [(1, 1), (2, 1), (1, 2)])
def test_fusing_only_where_atlases_disagree_changes_nothing(phantoms, patch, search):
    atlases, (target, _), _ = phantoms
    images, labels = [a[0] for a in atlases], [a[1] for a in atlases]
    restricted = JointFusionSettings(patch_radius=patch, search_radius=search)
    everywhere = JointFusionSettings(patch_radius=patch, search_radius=search,
                                     restrict_to_disagreement=False)
    fast = joint_label_fusion(target, images, labels, settings=restricted)
    full = joint_label_fusion(target, images, labels, settings=everywhere)
    np.testing.assert_array_equal(fast, full)
    assert len(np.unique(full)) > 2


def test_jlf_refuses_bad_input(phantoms):
    image, labels = phantoms[0][0]
    with pytest.raises(ValueError, match="one image per label map"):
        joint_label_fusion(image, [image], [labels, labels])
    with pytest.raises(ValueError, match="target's grid"):
        joint_label_fusion(image[:-1], [image, image], [labels, labels])
    with pytest.raises(ValueError, match="non-negative integer"):
        joint_label_fusion(image, [image, image], [labels * 1.0, labels])
    with pytest.raises(ValueError, match="unknown JLF metric"):
        JointFusionSettings(metric="CC")


# ----------------------------------------------------------------------------- SyN

@pytest.mark.parametrize("size, spacing", [(40, 1.0), (64, 2.0)])
def test_syn_recovers_a_known_shift_and_deformation(size, spacing):
    table = synthetic_label_table(4)
    atlas_image, atlas_labels = make_synthetic_subject((size,) * 3, seed=0, max_displacement=0)
    target_image, target_labels = make_synthetic_subject((size,) * 3, seed=5,
                                                         max_displacement=2.0)
    shift = (size // 12, -size // 12, size // 16)
    target_image = np.roll(target_image, shift, axis=(0, 1, 2))
    target_labels = np.roll(target_labels, shift, axis=(0, 1, 2))
    affine = np.eye(4)
    atlas = Volume(atlas_image, affine, None, "atlas.nii.gz")
    target = Volume(target_image, affine, None, "target.nii.gz")
    labels = Volume(atlas_labels, affine, None, "atlas_labels.nii.gz")
    settings = SynSettings(spacing=spacing, iterations=(40, 20, 0))
    warped = register_atlas(atlas, labels, target, settings)
    before = _dice(atlas_labels, target_labels, table)
    after = _dice(warped.labels, target_labels, table)
    assert before < 0.5 and after > 0.9, (before, after)
    assert warped.labels.shape == target_image.shape and warped.seconds > 0
    # One ITK thread and a fixed seed: the same labels bit for bit.
    again = register_atlas(atlas, labels, target, settings)
    np.testing.assert_array_equal(again.labels, warped.labels)


def test_syn_settings_refuse_bad_values():
    with pytest.raises(ValueError, match="unknown SyN transform"):
        SynSettings(transform="Affine")
    with pytest.raises(ValueError, match="seed"):
        SynSettings(seed=0)
    with pytest.raises(ValueError, match="label interpolator"):
        SynSettings(label_interpolator="linear")


# ----------------------------------------------------------------------------- caches

@pytest.fixture()
def synthetic_root(tmp_path):
    return write_synthetic_dataset(tmp_path / "data", n_subjects=5, shape=(40, 40, 40), seed=3)


@pytest.fixture()
def counting(monkeypatch):
    """Counts calls of the registration and of the two fusions inside multi_atlas."""
    calls = {"register": 0, "jlf": 0, "majority": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(syn, "register_atlas", counted("register", syn.register_atlas))
    # The rows fuse through fusion.fuse_atlases, which calls these two by their module names.
    monkeypatch.setattr(fusion, "joint_label_fusion", counted("jlf", fusion.joint_label_fusion))
    monkeypatch.setattr(fusion, "majority_vote", counted("majority", fusion.majority_vote))
    return calls


def test_registration_cache_registers_each_pair_once(synthetic_root, tmp_path, counting):
    subjects = find_subjects(synthetic_root)
    atlas, target = subjects["SYN01"], subjects["SYN02"]
    first = RegistrationCache(tmp_path / "reg", QUICK_SYN).warped_atlas(atlas, target)
    assert counting["register"] == 1
    assert (tmp_path / "reg" / "SYN01_to_SYN02_labels.nii.gz").exists()
    kept = RegistrationCache(tmp_path / "reg", QUICK_SYN).warped_atlas(atlas, target)
    assert counting["register"] == 1
    np.testing.assert_array_equal(kept.labels, first.labels)
    np.testing.assert_allclose(kept.image, first.image, atol=1e-6)
    assert kept.seconds == pytest.approx(first.seconds)
    # Other settings, or a changed target file, mean a new registration.
    RegistrationCache(tmp_path / "reg", SynSettings(spacing=4.0, iterations=(10, 0, 0))
                      ).warped_atlas(atlas, target)
    assert counting["register"] == 2
    os.utime(target.image, ns=(1, 1))
    RegistrationCache(tmp_path / "reg", QUICK_SYN).warped_atlas(atlas, target)
    assert counting["register"] == 3


def test_rows_register_once_fuse_both_ways_and_are_read_back(synthetic_root, tmp_path, counting):
    table = synthetic_label_table(4)
    data = DataConfig(root=str(synthetic_root), train_subjects=["SYN01", "SYN02", "SYN03"],
                      val_subjects=["SYN04", "SYN05"])
    atlases = ["SYN01", "SYN02", "SYN03"]
    out = tmp_path / "ants"
    rows = ants_multi_atlas(data, atlases, [1, 2], out, QUICK_SYN)
    assert list(rows) == ["ants_syn_k1", "ants_syn_jlf_k2", "ants_syn_majority_k2"]
    assert counting == {"register": 4, "jlf": 2, "majority": 2}
    for name, row in rows.items():
        assert [s.subject for s in row.scores] == ["SYN04", "SYN05"]
        assert set(row.seconds) == {"SYN04", "SYN05"} and row.seconds_per_case > 0
        assert (out / name / "segmentations" / "SYN04.nii.gz").exists()
    # k = 1: the registered labels of the first atlas, as kept in the cache.
    from ltnet_keras.data.io import load_label_map
    truth = load_label_map(synthetic_root / "labels" / "SYN04.nii.gz").array
    warped = load_label_map(out / "registrations" / "SYN01_to_SYN04_labels.nii.gz").array
    assert rows["ants_syn_k1"].scores[0].mean_structure == pytest.approx(
        _dice(warped, truth, table))
    # Seconds of a 2-atlas row: both registrations plus its fusion.
    records = [json.loads((out / "registrations" / f"SYN0{a}_to_SYN04.json").read_text())
               for a in (1, 2)]
    fusion = rows["ants_syn_jlf_k2"].extra["fusion_seconds"]["SYN04"]
    assert rows["ants_syn_jlf_k2"].seconds["SYN04"] == pytest.approx(
        sum(r["seconds"] for r in records) + fusion)

    # Same rows again: all read back. One more atlas: only its registrations and rows are new.
    again = ants_multi_atlas(data, atlases, [1, 2], out, QUICK_SYN)
    assert counting == {"register": 4, "jlf": 2, "majority": 2}
    assert again["ants_syn_jlf_k2"].scores[1].structures == pytest.approx(
        rows["ants_syn_jlf_k2"].scores[1].structures, abs=1e-6)
    more = ants_multi_atlas(data, atlases, [1, 2, 3], out, QUICK_SYN)
    assert counting == {"register": 6, "jlf": 4, "majority": 4}
    assert list(more)[-2:] == ["ants_syn_jlf_k3", "ants_syn_majority_k3"]
    with pytest.raises(ValueError, match="also atlases"):
        ants_multi_atlas(DataConfig(root=str(synthetic_root), val_subjects=["SYN01"]), atlases,
                         [2], out, QUICK_SYN)


def test_ranked_atlases_put_the_given_atlas_first_then_the_ranking(synthetic_root):
    from ltnet_keras.data.atlas import select_atlas
    data = DataConfig(root=str(synthetic_root),
                      train_subjects=["SYN01", "SYN02", "SYN03", "SYN04"])
    files = find_subjects(synthetic_root)
    ranking = select_atlas({s: files[s].image for s in data.train_subjects}, factor=2).ranking
    assert ranked_atlases(data, None, 4) == ranking
    chosen = ranking[-1]
    assert ranked_atlases(data, chosen, 3) == [chosen] + ranking[:2]
    assert ranked_atlases(data, chosen, 9) == [chosen] + ranking[:3]
    with pytest.raises(ValueError, match="not one of the training scans"):
        ranked_atlases(data, "SYN05", 2)


# ----------------------------------------------------------------------------- the script

def test_table3_config_is_the_lead_protocol():
    from ltnet_keras.config import load_config
    config = load_config(EXPERIMENTS / "configs" / "table3" / "ltnet.yaml")
    assert config.preset == "ltnet" and config.data.atlas == "auto"
    assert config.data.crop_shape == (128, 192, 128) and config.data.network_shape == (32, 48, 32)
    assert config.data.train_subjects == [f"S{i}" for i in range(11, 31)]
    assert config.data.val_subjects == [f"S{i}" for i in range(31, 41)]
    assert (config.train.steps, config.train.seed) == (500, 0)


@pytest.mark.slow
def test_table3_smoke_run_writes_every_row(lpba40_root, tmp_path, capsys):
    """Trains 2 steps, registers 2 atlases to 2 scans at 6 mm, fuses, scores."""
    sys.path.insert(0, str(EXPERIMENTS))
    import table3_multi_atlas
    out = tmp_path / "table3"
    # 2 training steps instead of the smoke's 10: no assertion reads what G_F learned.
    argv = ["--smoke", "--steps", "2", "--set", "train.log_every=2", "--set",
            "train.checkpoint_every=2", "--out", str(out), "--verbose", "0"]
    table3_multi_atlas.main(argv)
    expected = ["Atlas labels, no registration", "LT-Net (1 atlas)", "ANTs SyN (1 atlas)",
                "ANTs SyN + JLF, 2 atlases", "ANTs SyN + majority vote, 2 atlases",
                "LT-Net G_F + majority vote, 2 atlases (extra)", "LT-Net G_F + refine (1 atlas)",
                "LT-Net G_F + refine + majority vote, 2 atlases",
                "LT-Net G_F + refine + JLF, 2 atlases"]
    markdown = (out / "table3.md").read_text()
    lines = [line.split("|")[1:-1] for line in markdown.splitlines() if line.startswith("| ")]
    assert [cells[0].strip() for cells in lines[1:]] == expected
    by_method = {cells[0].strip(): [c.strip() for c in cells] for cells in lines[1:]}
    assert by_method["ANTs SyN + JLF, 2 atlases"][1] == "2"
    assert by_method["ANTs SyN + JLF, 2 atlases"][8] == "70.4 (4.4)"   # MABMIS, 2 atlases
    assert by_method["LT-Net (1 atlas)"][8] == "82.3 (2.5)"
    for method in expected[1:]:
        assert float(by_method[method][2]) > 0                          # s/case
    csv_lines = (out / "table3.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,atlases,seconds_per_case") and len(csv_lines) == 10
    subjects = (out / "table3_subjects.csv").read_text().splitlines()
    assert len(subjects) == 1 + 2 * len(expected)
    assert (out / "table3_boxplot.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "table3_dice_seconds.png").read_bytes()[:4] == b"\x89PNG"
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["atlases"] == ["S11", "S12"] and provenance["syn"]["spacing"] == 6.0
    assert provenance["refine"]["levels"] == [[8, 5], [4, 5]]
    assert len(list((out / "ants" / "registrations").glob("*.json"))) == 4
    # A second run reads every row back and writes the same table.
    capsys.readouterr()
    table3_multi_atlas.main(argv)
    printed = capsys.readouterr().out
    assert "ants_syn_jlf_k2: finished" in printed and "rows finished" in printed
    assert (out / "table3.md").read_text() == markdown
