"""ltnet_keras.data.dataset: the training pairs, with one atlas or several (data.extra_atlases)."""
import numpy as np
import pytest

from ltnet_keras.config import DataConfig, config_from_dict
from ltnet_keras.data.dataset import load_training_data, training_dataset
from ltnet_keras.data.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "data", n_subjects=5,
                                   shape=(32, 32, 32))


def _config(root, extra=()):
    return DataConfig(root=str(root), atlas="SYN01", extra_atlases=list(extra),
                      train_subjects=["SYN01", "SYN02", "SYN03", "SYN04"],
                      val_subjects=["SYN05"], crop_shape=(32, 32, 32), factor=2)


def _pairs(data, steps=40):
    batches = list(training_dataset(data, 1, seed=3, start_step=0, stop_step=steps))
    return ([b["atlas"].numpy()[0] for b in batches], [b["target"].numpy()[0] for b in batches],
            [b["atlas_labels"].numpy()[0] for b in batches])


def test_extra_atlases_are_drawn_as_moving_images_and_leave_the_pool(synthetic_root):
    one = load_training_data(_config(synthetic_root))
    two = load_training_data(_config(synthetic_root, ["SYN02"]))
    assert [t.subject for t in one.targets] == ["SYN02", "SYN03", "SYN04"]
    assert [t.subject for t in two.targets] == ["SYN03", "SYN04"]
    atlases, targets, labels = _pairs(two)
    moving = {"SYN01": two.atlas, "SYN02": two.extra_atlases[0]}
    which = [next(name for name, s in moving.items() if np.array_equal(a[..., 0], s.image))
             for a in atlases]
    assert set(which) == {"SYN01", "SYN02"}          # both atlases serve, 40 draws
    for name, image_labels in zip(which, labels):    # each with its own labels
        expected = two.atlas_one_hot if name == "SYN01" else two.extra_one_hot[0]
        np.testing.assert_array_equal(image_labels, expected)
    # A pure function of (seed, step): the same draws again, and a resumed run continues them.
    again, _, _ = _pairs(two)
    assert all(np.array_equal(a, b) for a, b in zip(atlases, again))
    resumed = list(training_dataset(two, 1, seed=3, start_step=25, stop_step=40))
    assert all(np.array_equal(b["atlas"].numpy()[0], a) for b, a in zip(resumed, atlases[25:]))


def test_one_atlas_pairs_do_not_depend_on_the_extra_atlas_stream(synthetic_root):
    data = load_training_data(_config(synthetic_root))
    atlases, targets, _ = _pairs(data, 12)
    assert all(np.array_equal(a[..., 0], data.atlas.image) for a in atlases)
    assert len({t.tobytes() for t in targets}) > 1


def test_extra_atlases_are_checked():
    with pytest.raises(ValueError, match="validation subject"):
        config_from_dict({"data": {"extra_atlases": ["S31"]}})
    with pytest.raises(ValueError, match="align: none"):
        config_from_dict({"data": {"extra_atlases": ["S12"], "align": "affine",
                                   "atlas": "S11"}})


def test_atlas_crop_gives_every_pool_scan_the_atlas_window(synthetic_root):
    """data.crop: 'atlas' crops every scan with the atlas' window (scans aligned onto its
    grid); 'brain' centres each window on that scan's own brain, which differs here."""
    def starts(crop):
        config = _config(synthetic_root)
        config.crop = crop
        data = load_training_data(config)
        return data.atlas.grid.crop_start, [t.grid.crop_start for t in data.targets]

    atlas_start, pool_starts = starts("atlas")
    assert pool_starts == [atlas_start] * 3
    atlas_start, pool_starts = starts("brain")
    assert any(start != atlas_start for start in pool_starts)


def test_crop_auto_follows_the_alignment():
    assert DataConfig(align="affine", atlas="S01").resolved_crop() == "atlas"
    assert DataConfig().resolved_crop() == "brain"
    assert DataConfig(crop="brain", align="affine").resolved_crop() == "brain"
    with pytest.raises(ValueError, match="data.crop"):
        config_from_dict({"data": {"crop": "centre"}})


def test_a_window_for_another_grid_is_refused_naming_the_scan(synthetic_root):
    from ltnet_keras.data.dataset import prepare_volumes
    from ltnet_keras.data.io import Volume
    from ltnet_keras.data.preprocess import GridSpec
    image = Volume(np.ones((30, 32, 32), np.float32), np.eye(4), None, "scans/odd.nii.gz")
    window = GridSpec((32, 32, 32), (4, 4, 4), (24, 24, 24), 2)
    with pytest.raises(Exception, match="odd.nii.gz"):
        prepare_volumes(image, None, (24, 24, 24), 2, grid=window)
