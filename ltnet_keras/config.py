"""Typed configuration: data, networks, loss weights, training, and the named presets.

One YAML file per run holds an :class:`ExperimentConfig`; :func:`load_config` validates it
and :func:`save_config` writes the resolved copy into the run directory.
"""
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml


def default_data_root() -> Path:
    """``$LTNET_DATA`` if set, else ``../shared/data/lpba40`` beside the repository."""
    env = os.environ.get("LTNET_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "lpba40"


def _beside_default_root(path: str) -> Path:
    """An absolute root as it is; a relative one (``freesurfer``) names a collection beside the
    default data root (``../shared/data/freesurfer``, or beside ``$LTNET_DATA``), so a config
    file that uses two collections holds no path of one machine."""
    path = Path(path)
    return path if path.is_absolute() else default_data_root().parent / path


@dataclass
class DataConfig:
    """Where the scans are and how they reach the network grid.

    ``atlas``: a subject id, or ``"auto"`` for the training scan closest to the pool's average.
    ``train_subjects`` are used WITHOUT labels; ``val_subjects`` labels serve only evaluation.
    ``train_root``: where the training scans are when not under ``root`` (the atlas and the
    validation subjects are): an atlas of one protocol (a FreeSurfer subject) trained with
    unlabelled scans from another collection; needs ``align: affine`` and a named atlas.
    A relative ``root`` / ``train_root`` names a collection beside the default data root
    (``freesurfer``, ``lpba40``); the command line's ``--data`` is taken as given.
    ``align``: ``"none"`` when the scans already share the atlas' space (LPBA40); ``"affine"``
    registers every scan affinely to the atlas first (ANTs; cached in the run directory), so a
    folder of raw scans in any orientation, voxel size and head position trains.
    ``crop``: where each scan's crop window sits. ``"brain"``: centred on that scan's own
    brain (scans in one common space, as LPBA40: G_F learns the small offsets between the
    windows). ``"atlas"``: the atlas' window for every scan, which is right once a scan has been
    aligned onto the atlas' grid: cropping it around its own brain would undo part of the
    alignment, and a pool whose brains are cut differently from the atlas' (LPBA40's masks
    against a FreeSurfer ``brainmask.mgz``: 12 voxels apart along I-S) teaches G_F a shift
    that the scans it later segments do not have. ``"auto"``: ``"atlas"`` with ``align:
    affine``, ``"brain"`` otherwise (:meth:`resolved_crop`).
    ``extra_atlases``: further labelled subjects that training draws, beside ``atlas``, as the
    moving image of each pair (pairwise training, as VoxelMorph is trained), so one G_F serves
    several atlases at test time (``ltnet segment --atlases``); ``atlas`` stays the one
    ``segment`` uses by default. They leave the unlabelled pool (``align: none`` only).
    """
    root: str = ""
    train_root: str = ""
    labels_tsv: str = ""
    atlas: str = "auto"
    extra_atlases: List[str] = field(default_factory=list)
    train_subjects: List[str] = field(default_factory=lambda: [f"S{i}" for i in range(11, 31)])
    val_subjects: List[str] = field(default_factory=lambda: [f"S{i}" for i in range(31, 41)])
    crop_shape: Tuple[int, int, int] = (160, 192, 160)
    factor: int = 2
    align: str = "none"
    crop: str = "auto"

    def resolved_crop(self) -> str:
        """``crop`` with ``"auto"`` decided by ``align`` (see the class docstring)."""
        if self.crop != "auto":
            return self.crop
        return "atlas" if self.align == "affine" else "brain"

    def resolved_root(self) -> Path:
        return _beside_default_root(self.root) if self.root else default_data_root()

    def resolved_train_root(self) -> Path:
        return _beside_default_root(self.train_root) if self.train_root else self.resolved_root()

    def resolved_labels_tsv(self) -> Path:
        return Path(self.labels_tsv) if self.labels_tsv else self.resolved_root() / "labels.tsv"

    @property
    def network_shape(self) -> Tuple[int, int, int]:
        return tuple(s // self.factor for s in self.crop_shape)


@dataclass
class NetworkConfig:
    """G_F/G_B are VoxelMorph U-Nets with these features; D is a 3D PatchGAN."""
    enc_features: List[int] = field(default_factory=lambda: [16, 32, 32, 32])
    dec_features: List[int] = field(default_factory=lambda: [32, 32, 32, 32, 32, 16, 16])
    int_steps: int = 0
    disc_features: List[int] = field(default_factory=lambda: [16, 32, 64, 128])
    disc_norm: str = "instance"


#: Loss terms beyond Eq. (11) (see :class:`LossWeights`).
EXTENSION_TERMS = ("inverse_sim", "inverse_trans")


@dataclass
class LossWeights:
    """Multiplier of each term of Eq. (11); 0 switches a term (and networks only it needs) off."""
    gan: float = 1.0
    sim: float = 1.0
    cyc: float = 10.0
    smooth: float = 3.0
    trans: float = 3.0
    anatomy_cyc: float = 3.0
    diff_cyc: float = 3.0
    # Not in the paper (0 = off): G_B also registers the scan itself to the atlas,
    # G_B(u, l), scored by NCC against l (inverse_sim), and that direct backward field must
    # invert G_F's as Eq. (8) asks of the cycle's (inverse_trans). Unlike Eq. (7)-(10), which
    # any invertible pair satisfies, this ties G_F to a second, independently supervised
    # estimate of the same correspondence (symmetric registration).
    inverse_sim: float = 0.0
    inverse_trans: float = 0.0
    ncc_window: int = 9

    def terms(self) -> Dict[str, float]:
        return {name: value for name, value in dataclasses.asdict(self).items()
                if name != "ncc_window"}

    @property
    def needs_backward(self) -> bool:
        return any(getattr(self, n) > 0 for n in ("cyc", "trans", "anatomy_cyc", "diff_cyc")
                   + EXTENSION_TERMS)

    @property
    def needs_direct_backward(self) -> bool:
        """G_B run on the scan itself, ``G_B(u, l)`` (the extension terms)."""
        return any(getattr(self, n) > 0 for n in EXTENSION_TERMS)

    @property
    def needs_discriminator(self) -> bool:
        return self.gan > 0

    @property
    def needs_atlas_labels(self) -> bool:
        return self.anatomy_cyc > 0 or self.diff_cyc > 0


@dataclass
class PenaltyConfig:
    """How the cycle terms are computed: the robust penalties of Eq. (7), (8) and (10) and the
    reconstruction of Eq. (5); the defaults are the paper's.

    ``cyc_eps = 0`` keeps Eq. (7)'s L1; ``cyc_eps > 0`` replaces it by the Charbonnier
    ``(x^2 + eps^2)^cyc_gamma``. Eq. (8) and (10) use ``rho(x) = (x^2 + eps^2)^gamma`` with
    ``eps = 0.001, gamma = 0.45``: L1-like, so its gradient does not vanish at the optimum.
    A larger eps (in voxels for Eq. (8), in label probability for Eq. (10)) makes rho quadratic
    near 0, so a nearly consistent cycle stops pulling the fields toward the identity.

    ``reconstruction``: ``"two_warps"`` computes ``l_bar = (l o dp_F) o dp_B`` (Eq. 1 then
    Eq. 5) and ``l_bar_s`` likewise, resampling twice; ``"composed"`` resamples ``l`` (and
    ``l_s``) once through the composed field ``dp_B + dp_F(t + dp_B(t))``, the same map in the
    continuum. Each linear resampling blurs, so with two of them ``l_bar != l`` even for exactly
    inverse fields unless the displacements are whole voxels: the cycle terms then pull toward
    zero fields whatever G_B does. One resampling of ``l`` has no such bias.
    """
    cyc_eps: float = 0.0
    cyc_gamma: float = 0.5
    trans_eps: float = 0.001
    trans_gamma: float = 0.45
    diff_eps: float = 0.001
    diff_gamma: float = 0.45
    reconstruction: str = "two_warps"


@dataclass
class TrainConfig:
    steps: int = 2000
    learning_rate: float = 2e-4
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    devices: int = 0            # 0 = every visible device
    jit_compile: bool = False
    # Not in the paper (0 = the paper): the terms beyond VoxelMorph's (GAN and the cycle terms)
    # ramp linearly from 0 to their Eq. (11) weight over this many steps. All of them are
    # minimal at zero fields, and from a zero-field start they hold G_F there (see README).
    ramp_steps: int = 0
    # --- not in the paper; the defaults are the paper's training (Sec. 5) ---
    # D's own learning rate (0 = the generators' learning_rate).
    discriminator_learning_rate: float = 0.0
    # D's weights move on every k-th step only (learning rate 0 in between).
    discriminator_every: int = 1
    # Std of Gaussian noise added to every image D sees (real and warped atlas alike).
    instance_noise: float = 0.0
    # One-sided label smoothing: D's target for real scans is 1 - label_smoothing.
    label_smoothing: float = 0.0
    # D's real scans pass through one linear resampling at a random sub-voxel shift, as the
    # warped atlas passes through the warp, so interpolation blur does not tell them apart.
    discriminator_resample_real: bool = False
    # A finished run directory whose forward_generator.h5 starts G_F (same grid and network).
    init_from: str = ""
    # G_F receives no gradient for the first N steps (G_B, D learn around a fixed G_F).
    freeze_forward_steps: int = 0
    # For the first N steps the cycle terms (Eq. 6 backward part, 7-10) update G_B only.
    cycle_backward_only_steps: int = 0
    # Every log_every steps: each active term's gradient norm w.r.t. the forward field on a
    # fixed training pair (history.csv, TensorBoard columns grad_<term>).
    log_grad_norms: bool = False
    # Memory, not mathematics: the backward pass recomputes each U-Net's activations instead
    # of keeping them from the forward pass (one more U-Net forward per step, much less
    # memory). Needed for the paper's 160x160x128 grid on a 24 GiB machine
    # (benchmarks/README.md).
    recompute_generators: bool = False


@dataclass
class SegmentConfig:
    """Eq. (2) at test time: ``nearest`` warps the label map, ``linear`` the one-hot + argmax."""
    label_interp: str = "linear"


@dataclass
class ExperimentConfig:
    name: str = "ltnet"
    preset: str = "ltnet"
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    weights: LossWeights = field(default_factory=LossWeights)
    penalties: PenaltyConfig = field(default_factory=PenaltyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)


# VoxelMorph's own regularisation for the CC similarity is lambda = 1 (Balakrishnan et al.,
# TMI 2019, Sec. V); the LT-Net rows use Eq. (11)'s lambda_2 = 3 on every regulariser.
_OFF = dict(gan=0.0, cyc=0.0, trans=0.0, anatomy_cyc=0.0, diff_cyc=0.0)
PRESETS: Dict[str, Dict[str, float]] = {
    "voxelmorph": dict(_OFF, smooth=1.0),
    "gan": dict(_OFF, gan=1.0),
    "gan_cyc": dict(_OFF, gan=1.0, cyc=10.0),
    "trans": dict(_OFF, gan=1.0, cyc=10.0, trans=3.0),
    "anatomy": dict(_OFF, gan=1.0, cyc=10.0, anatomy_cyc=3.0),
    "trans_anatomy": dict(_OFF, gan=1.0, cyc=10.0, trans=3.0, anatomy_cyc=3.0),
    "ltnet": {},
}
#: G_F's and G_B's weights in a training run's folder (here, not in ``training``: segmenting
#: reads them without importing what training needs).
FORWARD_WEIGHTS = "forward_generator.h5"
BACKWARD_WEIGHTS = "backward_generator.h5"
SEGMENT_INTERPOLATIONS = ("linear", "nearest")
RECONSTRUCTIONS = ("two_warps", "composed")
ALIGN_MODES = ("none", "affine")
CROP_MODES = ("auto", "brain", "atlas")


def _check_choice(value, valid, what):
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def apply_preset(config: ExperimentConfig, preset: str) -> ExperimentConfig:
    """Set ``config.weights`` to a named row of Tables 1-2 (Eq. (11) weights, terms switched)."""
    _check_choice(preset, tuple(PRESETS), "preset")
    weights = dataclasses.asdict(LossWeights())
    weights.update(PRESETS[preset])
    weights["ncc_window"] = config.weights.ncc_window
    return dataclasses.replace(config, preset=preset, weights=LossWeights(**weights))


def _from_dict(cls, values, where):
    """Build a dataclass from a dict, rejecting unknown keys with the valid ones listed."""
    values = dict(values or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        sub = names[name].type
        if dataclasses.is_dataclass(sub):
            value = _from_dict(sub, value, f"{where}.{name}")
        elif name in ("crop_shape",):
            value = tuple(int(v) for v in value)
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(values: dict, where="config") -> ExperimentConfig:
    """Build and validate a config; ``preset`` fills weights unless ``weights`` are given too."""
    values = dict(values or {})
    explicit_weights = values.pop("weights", None)
    config = _from_dict(ExperimentConfig, values, where)
    config = apply_preset(config, config.preset)
    if explicit_weights:
        merged = dataclasses.asdict(config.weights)
        merged.update(explicit_weights)
        weights = _from_dict(LossWeights, merged, f"{where}.weights")
        config = dataclasses.replace(config, weights=weights)
    validate(config)
    return config


def validate(config: ExperimentConfig) -> None:
    _check_choice(config.segment.label_interp, SEGMENT_INTERPOLATIONS, "segment.label_interp")
    _check_choice(config.network.disc_norm, ("instance", "batch", "none"), "network.disc_norm")
    _check_choice(config.data.align, ALIGN_MODES, "data.align")
    _check_choice(config.data.crop, CROP_MODES, "data.crop")
    extra = list(config.data.extra_atlases)
    if extra and config.data.align != "none":
        raise ValueError("data.extra_atlases needs data.align: none (scans in one space)")
    if set(extra) & set(config.data.val_subjects) or len(set(extra)) != len(extra):
        raise ValueError(f"data.extra_atlases {extra}: each at most once, none of them a "
                         f"validation subject ({list(config.data.val_subjects)})")
    if config.data.train_root and config.data.align != "affine":
        raise ValueError("data.train_root (training scans from another collection) needs "
                         "data.align: affine, which brings them into the atlas' space")
    if config.data.align != "none" and config.data.atlas == "auto":
        # select_atlas compares scans voxel by voxel, which only means something once they
        # share a space, and aligning them needs the atlas: name it.
        raise ValueError("data.align: affine needs data.atlas set to a subject id, not 'auto'")
    if config.data.factor < 1:
        raise ValueError(f"data.factor must be >= 1, got {config.data.factor}")
    for size in config.data.crop_shape:
        if size % config.data.factor:
            raise ValueError(f"data.crop_shape {config.data.crop_shape} is not divisible by "
                             f"data.factor {config.data.factor}")
    for size in config.data.network_shape:
        if size % 16:
            raise ValueError(f"network grid {config.data.network_shape} (crop_shape / factor) must "
                             "be divisible by 16: the U-Net halves it four times")
    if config.train.ramp_steps < 0:
        raise ValueError(f"train.ramp_steps must be >= 0, got {config.train.ramp_steps}")
    if config.train.steps < 0 or config.train.checkpoint_every < 1:
        raise ValueError("train.steps must be >= 0 and train.checkpoint_every >= 1")
    train = config.train
    for name in ("freeze_forward_steps", "cycle_backward_only_steps",
                 "discriminator_learning_rate", "instance_noise"):
        if getattr(train, name) < 0:
            raise ValueError(f"train.{name} must be >= 0, got {getattr(train, name)}")
    if train.discriminator_every < 1:
        raise ValueError(f"train.discriminator_every must be >= 1, got {train.discriminator_every}")
    if not 0.0 <= train.label_smoothing < 1.0:
        raise ValueError(f"train.label_smoothing must be in [0, 1), got {train.label_smoothing}")
    _check_choice(config.penalties.reconstruction, RECONSTRUCTIONS, "penalties.reconstruction")
    for name, value in dataclasses.asdict(config.penalties).items():
        if name == "reconstruction":
            continue
        if value < 0 or (name.endswith("gamma") and not 0.0 < value <= 1.0):
            raise ValueError(f"penalties.{name} = {value}: eps must be >= 0 and gamma in (0, 1]")
    if config.penalties.trans_eps == 0 or config.penalties.diff_eps == 0:
        # rho(x) = |x|^(2 gamma) has no finite gradient at 0 for gamma < 0.5.
        raise ValueError("penalties.trans_eps and penalties.diff_eps must be > 0")


def load_config(path, overrides: Optional[dict] = None) -> ExperimentConfig:
    """Read a YAML config; ``overrides`` (dotted keys, e.g. ``{"train.steps": 40}``) win."""
    with open(path) as handle:
        values = yaml.safe_load(handle) or {}
    return config_from_dict(apply_overrides(values, overrides), where=str(path))


def apply_overrides(values: dict, overrides: Optional[dict]) -> dict:
    """Set dotted keys (``"train.steps"``) in a config dict; a new preset drops old weights."""
    for dotted, value in (overrides or {}).items():
        node = values
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
        if dotted == "preset":
            values.pop("weights", None)
    return values


def config_to_dict(config) -> dict:
    """A config dataclass with a ``data`` section (:class:`ExperimentConfig`, the segmentation
    U-Net's ``SegNetConfig``) as plain YAML-ready values."""
    values = dataclasses.asdict(config)
    values["data"]["crop_shape"] = list(config.data.crop_shape)
    return values


def flat_config(config) -> Dict[str, object]:
    """:func:`config_to_dict` with dotted keys: ``{"train.steps": 500, ...}``."""
    def flatten(values: dict, prefix: str) -> Dict[str, object]:
        flat = {}
        for key, value in values.items():
            if isinstance(value, dict):
                flat.update(flatten(value, f"{prefix}{key}."))
            else:
                flat[f"{prefix}{key}"] = value
        return flat
    return flatten(config_to_dict(config), "")


def check_resume_config(run_dir, config, load=None) -> None:
    """A resumed run must continue the same experiment: ``run_dir/config.yaml`` (read back
    through ``load``, default :func:`load_config`, so options added since the run started
    take their defaults) equals ``config`` except for ``train.steps``, which may be extended."""
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.exists():
        return
    saved = config_to_dict((load or load_config)(saved_path))
    current = config_to_dict(config)
    for values in (saved, current):
        values["train"].pop("steps", None)
    if saved != current:
        raise ValueError(f"{run_dir} holds a run with a different configuration; use another "
                         "run directory or the same config (only train.steps may change on "
                         "resume)")


def save_config(config, path) -> None:
    from ltnet_keras.records import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
