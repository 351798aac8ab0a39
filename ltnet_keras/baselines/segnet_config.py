"""Configuration of the segmentation-network baselines of Table 5.

Two methods train the same segmentation U-Net (:mod:`ltnet_keras.baselines.segnet`):

* ``supervised``: on the manual labels of every scan in ``data.train_subjects`` (the fully
  supervised upper bound of the paper's Table 5);
* ``dataaug``: on volumes synthesised from the atlas alone (Zhao et al., "Data augmentation
  using learned transformations for one-shot medical image segmentation", CVPR 2019;
  :mod:`ltnet_keras.baselines.dataaug`), with the spatial transforms of a finished VoxelMorph run.

One YAML per run holds a :class:`SegNetConfig`; the ``data`` section is the registration runs'
:class:`~ltnet_keras.config.DataConfig`, so both kinds of rows share one grid and one split.
"""
from dataclasses import dataclass, field
from typing import List, Optional

import yaml

from ltnet_keras.config import (DataConfig, _check_choice, _from_dict, apply_overrides,
                                config_to_dict, save_config)

SEGNET_METHODS = ("supervised", "dataaug")
#: How DataAug carries the atlas labels through a spatial transform: trilinear on the one-hot
#: map (soft targets) or nearest neighbour (Zhao et al.'s released code).
SYNTHETIC_LABEL_INTERPOLATIONS = ("linear", "nearest")


def _default_encoder():
    return [16, 32, 32, 32]


def _default_decoder():
    return [32, 32, 32, 32, 32, 16, 16]


@dataclass
class SegNetNetworkConfig:
    """voxelmorph 0.2's U-Net features (its defaults, those of G_F and G_B)."""
    enc_features: List[int] = field(default_factory=_default_encoder)
    dec_features: List[int] = field(default_factory=_default_decoder)


@dataclass
class SegNetTrainConfig:
    """Adam on ``dice_weight * soft Dice + cross_entropy_weight * cross-entropy``."""
    steps: int = 1000
    learning_rate: float = 1e-3
    batch_size: int = 1
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    dice_weight: float = 1.0
    cross_entropy_weight: float = 1.0


@dataclass
class AppearanceConfig:
    """DataAug's appearance model: a U-Net predicting an additive intensity change in atlas
    space. ``smooth`` is Zhao et al.'s lambda_a (0.02: their weights 1 on the smoothness term
    and 50 on the reconstruction term)."""
    steps: int = 200
    learning_rate: float = 1e-3
    smooth: float = 0.02
    checkpoint_every: int = 100
    log_every: int = 10
    enc_features: List[int] = field(default_factory=_default_encoder)
    dec_features: List[int] = field(default_factory=_default_decoder)


@dataclass
class DataAugConfig:
    """``spatial_run``: a finished VoxelMorph run (its ``forward_generator.h5``, atlas and grid).

    ``atlas_fraction``: share of the training draws that show the atlas itself instead of a
    synthetic volume. ``label_interp``: see :data:`SYNTHETIC_LABEL_INTERPOLATIONS`.
    """
    spatial_run: str = ""
    appearance: AppearanceConfig = field(default_factory=AppearanceConfig)
    label_interp: str = "nearest"
    atlas_fraction: float = 0.05


@dataclass
class SegNetConfig:
    name: str = "segnet"
    method: str = "supervised"
    data: DataConfig = field(default_factory=DataConfig)
    network: SegNetNetworkConfig = field(default_factory=SegNetNetworkConfig)
    train: SegNetTrainConfig = field(default_factory=SegNetTrainConfig)
    dataaug: DataAugConfig = field(default_factory=DataAugConfig)


def validate_segnet(config: SegNetConfig, where: str = "config") -> None:
    """Refuse values that cannot train; the message names ``where`` (the YAML file)."""
    _check_choice(config.method, SEGNET_METHODS, f"{where}: method")
    _check_choice(config.dataaug.label_interp, SYNTHETIC_LABEL_INTERPOLATIONS,
                  f"{where}: dataaug.label_interp")
    data = config.data
    if data.factor < 1 or any(size % data.factor for size in data.crop_shape):
        raise ValueError(f"{where}: data.crop_shape {data.crop_shape} must be divisible by "
                         f"data.factor {data.factor} (>= 1)")
    if any(size % 16 for size in data.network_shape):
        raise ValueError(f"{where}: network grid {data.network_shape} (crop_shape / factor) must "
                         "be divisible by 16: the U-Net halves it four times")
    train, appearance = config.train, config.dataaug.appearance
    for section, values in (("train", train), ("dataaug.appearance", appearance)):
        if values.steps < 0 or values.log_every < 1 or values.checkpoint_every < 1:
            raise ValueError(f"{where}: {section}.steps must be >= 0, log_every and "
                             "checkpoint_every >= 1")
        if values.steps % values.log_every or values.checkpoint_every % values.log_every:
            raise ValueError(f"{where}: {section}.steps ({values.steps}) and checkpoint_every "
                             f"({values.checkpoint_every}) must be multiples of log_every "
                             f"({values.log_every})")
        if values.learning_rate <= 0:
            raise ValueError(f"{where}: {section}.learning_rate must be > 0")
    if train.batch_size < 1:
        raise ValueError(f"{where}: train.batch_size must be >= 1")
    if train.dice_weight < 0 or train.cross_entropy_weight < 0 or \
            train.dice_weight + train.cross_entropy_weight == 0:
        raise ValueError(f"{where}: train.dice_weight and train.cross_entropy_weight must be "
                         ">= 0 and not both 0")
    if appearance.smooth < 0:
        raise ValueError(f"{where}: dataaug.appearance.smooth must be >= 0")
    if not 0.0 <= config.dataaug.atlas_fraction <= 1.0:
        raise ValueError(f"{where}: dataaug.atlas_fraction must be in [0, 1]")
    if config.method == "dataaug" and data.align != "none":
        raise ValueError(f"{where}: DataAug synthesises volumes in the atlas' space and needs the "
                         "scans in that space already (data.align: none)")


def segnet_config_from_dict(values: dict, where: str = "config") -> SegNetConfig:
    config = _from_dict(SegNetConfig, values, where)
    validate_segnet(config, where)
    return config


def load_segnet_config(path, overrides: Optional[dict] = None) -> SegNetConfig:
    """Read a segmentation-network YAML; ``overrides`` (dotted keys) win."""
    with open(path) as handle:
        values = yaml.safe_load(handle) or {}
    return segnet_config_from_dict(apply_overrides(values, overrides), where=str(path))


# The registration configs' writers serve any config with a data section.
segnet_config_to_dict = config_to_dict
save_segnet_config = save_config

