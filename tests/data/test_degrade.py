"""Degraded copies of a scan for QC calibration: deterministic, on the same grid, and worse
at severity 2 than at 1."""
import numpy as np
import pytest

from ltnet_keras.data.degrade import DEGRADATIONS, degrade


@pytest.fixture(scope="module")
def scan():
    rng = np.random.default_rng(3)
    axes = np.meshgrid(*[np.linspace(-1, 1, 40)] * 3, indexing="ij")
    inside = sum(a ** 2 for a in axes) < 0.7
    texture = 60 + 40 * np.sin(6 * axes[0]) * np.cos(5 * axes[1]) + rng.normal(0, 1, inside.shape)
    return np.where(inside, texture, 0).astype(np.float32)


@pytest.mark.parametrize("kind", sorted(DEGRADATIONS))
def test_each_degradation_is_seeded_keeps_the_grid_and_grows_with_severity(scan, kind):
    mild, strong = degrade(scan, kind, 1, seed=5), degrade(scan, kind, 2, seed=5)
    assert mild.shape == scan.shape and mild.dtype == np.float32
    assert np.array_equal(mild, degrade(scan, kind, 1, seed=5))
    change = [float(np.abs(d - scan).mean()) for d in (mild, strong)]
    assert 0 < change[0] < change[1], change


def test_partial_field_of_view_removes_a_slab_of_the_object(scan):
    cut = degrade(scan, "partial_fov", 2, seed=1)
    lost = ((scan > 0) & (cut == 0)).sum() / (scan > 0).sum()
    assert 0.1 < lost < 0.5
    assert np.array_equal(cut[cut > 0], scan[cut > 0])


def test_unknown_degradation_and_severity_are_refused(scan):
    with pytest.raises(ValueError, match="valid: noise"):
        degrade(scan, "rain", 1, 0)
    with pytest.raises(ValueError, match="severity"):
        degrade(scan, "noise", 3, 0)
