"""Test-time refinement of G_F's forward field: coarse-to-fine Adam on local NCC.

G_F predicts the forward field on the network grid in one pass; here that field is the start
of an instance optimisation (as in ConvexAdam's Adam stage, or voxelmorph's instance training)
that maximises the local NCC between the target and the warped atlas on a pyramid of grids.

Grids and units. Both images are the *crops* the network sees, at 1 mm (e.g. 128x192x128),
each centred on its own brain (``GridSpec.crop``): crop voxel ``c`` of the target faces crop
voxel ``c + u(c)`` of the atlas. A level of factor ``f`` is the crop block-averaged by ``f``
(``GridSpec.downsample``: level voxel ``i`` is centred on crop voxel ``f i + (f - 1) / 2``), and
a field on it is in *that level's voxels*, pull convention: ``warped(i) = atlas(i + u(i))``.
G_F's field is such a field at the network factor (4 for ``results/recipe/voxelmorph``), so the
refined field, returned at the last level's factor, goes to the scan's grid exactly as G_F's
does: ``field_to_grid(result.field, original_shape, crop_start, result.factor)``.

An Adam step is a few XLA programs (smoothing, warp, NCC, chain rule, Adam; the equations and
their written-out gradients are in :mod:`ltnet_keras.inference.refine_equations`), each
compiled once per grid shape and structural setting (window, smoothing passes): the first
scan of a shape pays ~20 s of compilation, the next ones none. Kept apart on purpose:
compiled as one program, XLA fuses the box sums' shifted slices into their consumers and
recomputes whole chains per read (2-20x slower, measured).
"""
import time
from dataclasses import dataclass, field as dc_field
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from ltnet_keras._compat import stable_function_names
from ltnet_keras.data.preprocess import normalise_intensity
from ltnet_keras.models import trilinear
from ltnet_keras.inference.programs import compiled
from ltnet_keras.inference.refine_cycle import CycleWeights
from ltnet_keras.inference.refine_equations import (  # noqa: F401  (the equations, re-exported)
    ADAM_BETAS, ADAM_EPSILON, NCC_EPSILON, adam_update, box_sum, box_sum_axis, corner_table,
    diffusion_and_gradient, folding_fraction, integrate_velocity, ncc_and_gradient, smooth,
    smooth_transpose, target_sums, warp_and_derivative)


#: Level factors (voxel size in mm of a 1 mm crop) a level may use, finest 1.
VALID_FACTORS = (1, 2, 4, 8)
#: Where refinement starts: G_F's field (and G_B's, if the run has one), or the identity.
STARTS = ("network", "zero")
#: ``plain``: NCC + diffusion on the forward field; ``ltnet``: both fields with the cycle
#: terms of Eq. 7-10 (:mod:`ltnet_keras.inference.refine_cycle`).
OBJECTIVES = ("plain", "ltnet")
#: Upper bound on Adam steps per level (a sanity bound: the sweep never needed 100).
MAX_STEPS = 1000


def parse_levels(text: str):
    """``"4:60,2:40"`` -> ``((4, 60), (2, 40))``: (factor, steps) per level, coarse to fine."""
    try:
        return tuple(tuple(int(n) for n in level.split(":", 1)) for level in text.split(","))
    except ValueError:
        raise ValueError(f"--refine-levels {text!r}: expected FACTOR:STEPS pairs separated by "
                         "commas, coarse to fine, e.g. 4:60,2:40 (factors: 1, 2, 4, 8)") from None



@dataclass(frozen=True)
class RefineSettings:
    """How :func:`refine_field` optimises the field.

    ``levels``: ``(factor, steps)`` pairs, coarse to fine; ``factor`` is the level's voxel
    size in crop voxels (mm at 1 mm), one of :data:`VALID_FACTORS`, and must divide the crop.
    ``learning_rate``: Adam's step, in voxels of each level. ``ncc_window``: side of the local
    NCC window in mm; at factor ``f`` it becomes the odd size nearest ``ncc_window / f``, at
    least 3 (:func:`level_window`). ``regularizer_weight``: weight of the diffusion term
    (:func:`diffusion_loss`). ``smoothing_passes``: 3^3 average pools applied to the update in
    every step (0: none). ``diffeomorphic``: optimise a stationary velocity integrated by
    ``integration_steps`` scaling-and-squaring steps instead of the displacement (G_F's
    displacement starts the velocity, ``exp(v) ~ id + v``; slow: see ``results/refine``).
    ``tolerance``: stop a level once the loss improved by less than this fraction over the
    last ``patience`` steps (0: always run every step).
    ``start``: ``network`` (G_F's field, and G_B's for ``ltnet``) or ``zero`` (the identity).
    ``objective``: ``plain``, or ``ltnet`` (both fields with the cycle terms weighted by
    ``cycle``, :mod:`ltnet_keras.inference.refine_cycle`).

    Defaults: the best of the sweep on the validation scans S31-S40 (``results/refine``):
    40 Adam steps at 8 mm, 30 at 4 mm, 15 at 2 mm, step 0.2 voxel, 9 mm NCC window, diffusion
    weight 1, two smoothing passes; ~2.5 s per 128x192x128 crop on one core. The 2 mm level
    is worth ~1.5 Dice points, the 8 mm one ~0.5; more steps gained nothing (1 mm untried).
    ``network`` + ``plain``: at this budget every start ends within 0.1 Dice point and
    ``ltnet`` gains 0.1-0.2 for 4x the time (``results/refine_ltnet``, README).
    """
    levels: Tuple[Tuple[int, int], ...] = ((8, 40), (4, 30), (2, 15))
    learning_rate: float = 0.2
    ncc_window: float = 9.0
    regularizer_weight: float = 1.0
    smoothing_passes: int = 2
    diffeomorphic: bool = False
    integration_steps: int = 7
    tolerance: float = 0.0
    patience: int = 10
    start: str = "network"
    objective: str = "plain"
    cycle: CycleWeights = dc_field(default_factory=CycleWeights)

    def __post_init__(self):
        if isinstance(self.cycle, dict):
            object.__setattr__(self, "cycle", CycleWeights(**self.cycle))
        if self.start not in STARTS:
            raise ValueError(f"refinement start {self.start!r} is not one of {', '.join(STARTS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"refinement objective {self.objective!r} is not one of "
                             f"{', '.join(OBJECTIVES)}")
        if self.objective == "ltnet" and self.diffeomorphic:
            raise ValueError("the ltnet objective refines displacements: it does not combine "
                             "with diffeomorphic")
        try:
            levels = tuple((int(f), int(s)) for f, s in self.levels)
        except (TypeError, ValueError):
            raise ValueError(f"levels must be (factor, steps) pairs, e.g. ((4, 60), (2, 40)); "
                             f"got {self.levels!r}") from None
        object.__setattr__(self, "levels", levels)
        if not levels:
            raise ValueError("levels must hold at least one (factor, steps) pair")
        for factor, steps in levels:
            if factor not in VALID_FACTORS:
                raise ValueError(f"level factor {factor} is not valid; valid: "
                                 f"{', '.join(map(str, VALID_FACTORS))}")
            if not 0 <= steps <= MAX_STEPS:
                raise ValueError(f"steps per level must be in 0..{MAX_STEPS}, not {steps}")
        factors = [f for f, _ in levels]
        if any(a <= b for a, b in zip(factors, factors[1:])):
            raise ValueError(f"levels must go coarse to fine with distinct factors (e.g. 4 then "
                             f"2); got factors {factors}")
        checks = [(self.learning_rate > 0, f"learning_rate must be > 0, not {self.learning_rate}"),
                  (self.ncc_window >= 3, f"ncc_window must be >= 3 mm, not {self.ncc_window}"),
                  (self.regularizer_weight >= 0,
                   f"regularizer_weight must be >= 0, not {self.regularizer_weight}"),
                  (self.tolerance >= 0, f"tolerance must be >= 0, not {self.tolerance}"),
                  (int(self.patience) == self.patience and self.patience >= 1,
                   f"patience must be an integer >= 1, not {self.patience}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for name, low in (("smoothing_passes", 0), ("integration_steps", 0)):
            value = getattr(self, name)
            if int(value) != value or not low <= value <= 12:
                raise ValueError(f"{name} must be an integer in {low}..12, not {value}")
        if self.diffeomorphic not in (True, False):
            raise ValueError(f"diffeomorphic must be True or False, not {self.diffeomorphic!r}")

    def to_dict(self) -> dict:
        return {"levels": [list(level) for level in self.levels],
                "learning_rate": self.learning_rate, "ncc_window": self.ncc_window,
                "regularizer_weight": self.regularizer_weight,
                "smoothing_passes": self.smoothing_passes, "diffeomorphic": self.diffeomorphic,
                "integration_steps": self.integration_steps, "tolerance": self.tolerance,
                "patience": self.patience, "start": self.start, "objective": self.objective,
                "cycle": self.cycle.to_dict()}


@dataclass
class RefineResult:
    """The refined forward field and how it was reached.

    ``field``: ``(x, y, z, 3)`` float32 on the crop down-sampled by ``factor`` (the last
    level's), in voxels of that grid, pull convention (``warped(i) = atlas(i + field(i))``):
    pass it with ``factor`` to ``field_to_grid`` as G_F's network field is passed with the
    network factor. ``loss_history``: per level, the loss before each step run, and
    ``final_loss`` after the last. ``folding_fraction``: fraction of ``field``'s voxels with
    ``det J <= 0`` (:func:`folding_fraction`).
    """
    field: np.ndarray
    factor: int
    loss_history: Tuple[np.ndarray, ...]
    final_loss: float
    seconds_per_level: Tuple[float, ...]
    steps_per_level: Tuple[int, ...]
    folding_fraction: float
    settings: RefineSettings = dc_field(default_factory=RefineSettings)
    #: With the ``ltnet`` objective: the backward field ``(x, y, z, 3)`` on the atlas' crop at
    #: ``factor`` (pull: ``target(s + B(s))`` faces ``atlas(s)``), and the mean length (mm) of
    #: the round trip ``F(p) + B(p + F(p))`` (0 when B inverts F).
    backward_field: Optional[np.ndarray] = None
    inverse_consistency_mm: Optional[float] = None

    @property
    def seconds(self) -> float:
        return float(sum(self.seconds_per_level))


# -------------------------------------------------------------------------- grids and fields
def level_window(ncc_window: float, factor: int) -> int:
    """NCC window (voxels) at a level of ``factor``: the odd integer nearest ``ncc_window /
    factor``, at least 3 (9 mm -> 9, 5, 3 voxels at 1, 2, 4 mm)."""
    return max(3, 2 * int(np.floor((ncc_window / factor - 1.0) / 2.0 + 0.5)) + 1)


def downsample_image(image: np.ndarray, factor: int) -> np.ndarray:
    """Block mean of a crop ``(X, Y, Z)`` by ``factor`` (``GridSpec.downsample``'s images)."""
    if factor == 1:
        return np.asarray(image, np.float32)
    x, y, z = (n // factor for n in image.shape)
    blocks = np.asarray(image, np.float32).reshape(x, factor, y, factor, z, factor)
    return blocks.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def resample_field(field, from_factor: int, to_factor: int, shape) -> tf.Tensor:
    """A field ``(x, y, z, 3)`` on the crop's ``from_factor`` grid -> the ``to_factor`` grid of
    ``shape`` (3 ints), in the new grid's voxels: linear between block centres (clamped beyond
    the outermost), as ``field_to_grid`` up-samples G_F's field."""
    out = tf.convert_to_tensor(field, tf.float32)
    for axis in range(3):
        n_in = int(out.shape[axis])
        centre = (to_factor * np.arange(shape[axis]) + (to_factor - 1) / 2.0
                  - (from_factor - 1) / 2.0) / from_factor
        q = np.clip(centre, 0.0, n_in - 1)
        lower = np.minimum(np.floor(q).astype(np.int32), max(n_in - 2, 0))
        upper = np.minimum(lower + 1, n_in - 1)
        weight = (q - lower).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(4)])
        out = (tf.gather(out, lower, axis=axis) * (1.0 - weight)
               + tf.gather(out, upper, axis=axis) * weight)
    return out * (from_factor / to_factor)


def crop_image(image, grid) -> np.ndarray:
    """A scan's intensity-normalised crop at full resolution, as :func:`refine_field` wants
    it: ``grid`` is the scan's ``GridSpec`` (``PreparedSubject.grid``)."""
    return grid.crop(normalise_intensity(np.asarray(image, np.float32)))


# -------------------------------------------------------------------------- one level
# Programs are stored under names of their own (inference/programs.py); the few traced anew in
# every process (``_square_vjp``: it calls another program) still find their XLA code when
# their names do not hang on what the process traced before (the Python API's too).
stable_function_names()


@compiled
def _state(base, delta, passes):
    return base + smooth(delta, passes)


@compiled
def _ncc_piece(target, sums, warped, window):
    return ncc_and_gradient(target, warped, window, sums)


@compiled
def _chain(field, derivative, similarity, d_warped, weight):
    regulariser, d_field = diffusion_and_gradient(field)
    return (-similarity + weight * regulariser,
            -d_warped[None] * derivative + weight * d_field)


@compiled
def _square(field):
    """One scaling-and-squaring step ``u + u(grid + u)`` of ``(3, x, y, z)``."""
    moved = tf.transpose(field, [1, 2, 3, 0])[None]
    return field + tf.transpose(trilinear.warp(moved, moved)[0], [3, 0, 1, 2])


@compiled
def _square_vjp(field, upstream):
    with tf.GradientTape() as tape:
        tape.watch(field)
        out = _square(field)
    return tape.gradient(out, field, output_gradients=upstream)


def _integrate(velocity, steps: int):
    """:func:`integrate_velocity` one squaring per XLA program (compiled together, XLA
    recomputes each warp's chain inside the next one's gathers: ~100x slower); returns the
    displacement and the fields before each squaring (for :func:`_integrate_vjp`)."""
    fields = [velocity / float(2 ** steps)]
    for _ in range(steps):
        fields.append(_square(fields[-1]))
    return fields[-1], fields[:-1]


def _integrate_vjp(fields, upstream, steps: int):
    """``dL/dv`` from ``dL/d(exp v)``, back through the squarings."""
    for field in reversed(fields):
        upstream = _square_vjp(field, upstream)
    return upstream / float(2 ** steps)


_adam = compiled(adam_update)
_warp = compiled(warp_and_derivative)
_target_sums = compiled(target_sums)
_corner_table = compiled(corner_table)
_smooth_transpose = compiled(smooth_transpose)


def _loss_and_gradient(table, target, sums, base, delta, settings: RefineSettings, window):
    """Loss at ``base + smooth(delta)`` and its gradient with respect to ``delta``, chained
    by hand through the compiled pieces; also the displacement."""
    state = _state(base, delta, settings.smoothing_passes)
    field, fields = ((state, None) if not settings.diffeomorphic
                     else _integrate(state, settings.integration_steps))
    warped, derivative = _warp(table, field)
    similarity, d_warped = _ncc_piece(target, sums, warped, window)
    loss, gradient = _chain(field, derivative, similarity, d_warped,
                            tf.constant(settings.regularizer_weight, tf.float32))
    if settings.diffeomorphic:
        gradient = _integrate_vjp(fields, gradient, settings.integration_steps)
    return loss, _smooth_transpose(gradient, settings.smoothing_passes), state, field


def _run_level(atlas, target, base, steps: int, settings: RefineSettings, window: int):
    """Adam on ``delta``, the update of ``base`` (smoothed), for ``steps`` steps or until the
    loss improved by less than ``tolerance`` (relative) over ``patience`` steps. Images
    ``(x, y, z)``, ``base`` ``(3, x, y, z)``. Returns (state, displacement, history, loss)."""
    sums, table = _target_sums(target, window), _corner_table(atlas)
    delta = m = v = tf.zeros_like(base)
    learning_rate = tf.constant(settings.learning_rate, tf.float32)
    history = []
    for k in range(steps):
        loss, gradient, _, _ = _loss_and_gradient(table, target, sums, base, delta, settings,
                                                  window)
        delta, m, v = _adam(delta, m, v, gradient, tf.constant(k + 1, tf.float32),
                            learning_rate)
        history.append(float(loss))
        if settings.tolerance and k >= settings.patience:
            earlier = history[-1 - settings.patience]
            if earlier - history[-1] < settings.tolerance * abs(earlier):
                break
    loss, _, state, field = _loss_and_gradient(table, target, sums, base, delta, settings,
                                               window)
    return state, field, np.array(history, np.float32), float(loss)


def network_factor(crop_shape, field_shape) -> int:
    """The factor of a field's grid on a crop: ``crop // field`` along every axis."""
    ratios = {c / f for c, f in zip(crop_shape, field_shape[:3])}
    factor = ratios.pop() if len(ratios) == 1 else 0
    if factor < 1 or factor != int(factor) or any(c % int(factor) for c in crop_shape):
        raise ValueError(f"field grid {tuple(field_shape[:3])} is not the crop {tuple(crop_shape)}"
                         " down-sampled by one integer factor")
    return int(factor)


def refine_field(atlas_image, target_image, initial_field,
                 settings: Optional[RefineSettings] = None, initial_backward=None,
                 atlas_labels=None) -> RefineResult:
    """Refine a forward field by coarse-to-fine Adam on local NCC + diffusion (``plain``), or
    the forward and backward fields together under LT-Net's cycle terms (``ltnet``).

    Args:
        atlas_image, target_image: ``(X, Y, Z)`` float32 crops at full resolution (1 mm), each
            intensity-normalised and cropped around its own brain like the network's input
            (:func:`crop_image`); same shape, divisible by every level factor.
        initial_field: ``(X / n, Y / n, Z / n, 3)``: G_F's forward field on the network grid
            (the crop down-sampled by ``n``, e.g. 4 -> 32x48x32), in network voxels, pull
            convention ``warped(i) = atlas(i + field(i))``; ``settings.start == "zero"``
            replaces it (and ``initial_backward``) by the identity.
        settings: :class:`RefineSettings` (default: 40, 30, 15 steps at 8, 4, 2 mm).
        initial_backward: ``ltnet`` only: G_B's backward field on the same grid (pull:
            ``target(s + B(s))`` faces ``atlas(s)``); without it, G_F's field inverted
            (:func:`~ltnet_keras.inference.refine_cycle.approximate_inverse`).
        atlas_labels: ``ltnet`` with the label terms (Eq. 9, 10): the atlas' label crop.

    Returns:
        :class:`RefineResult`, its field at the last level's factor in that grid's voxels.
        The first call for a crop shape compiles each level (seconds); later calls reuse it.
    """
    settings = settings or RefineSettings()
    atlas_image = np.asarray(atlas_image, np.float32)
    target_image = np.asarray(target_image, np.float32)
    if atlas_image.ndim != 3 or atlas_image.shape != target_image.shape:
        raise ValueError(f"atlas and target crops must be (X, Y, Z) of one shape; got "
                         f"{atlas_image.shape} and {target_image.shape}")
    initial_field = np.asarray(initial_field, np.float32)
    if initial_field.ndim != 4 or initial_field.shape[-1] != 3:
        raise ValueError(f"initial field must be (x, y, z, 3); got {initial_field.shape}")
    state_factor = network_factor(atlas_image.shape, initial_field.shape)
    fits = [f for f in VALID_FACTORS if not any(n % f for n in atlas_image.shape)]
    bad = [f for f, _ in settings.levels if f not in fits]
    if bad:
        raise ValueError(f"level factors {bad} do not divide the crop {atlas_image.shape}; "
                         f"valid: {fits}")
    if settings.start == "zero":
        initial_field = np.zeros_like(initial_field)
    if settings.objective == "ltnet":
        return _refine_pair(atlas_image, target_image, initial_field, initial_backward,
                            atlas_labels, state_factor, settings)
    state = tf.constant(initial_field)  # diffeomorphic: G_F's displacement starts the velocity
    histories, seconds, steps_run = [], [], []
    final_loss, factor, displacement = float("nan"), state_factor, state
    for factor, steps in settings.levels:
        clock = time.perf_counter()
        shape = tuple(n // factor for n in atlas_image.shape)
        base = tf.transpose(resample_field(state, state_factor, factor, shape), [3, 0, 1, 2])
        atlas = tf.constant(downsample_image(atlas_image, factor))
        target = tf.constant(downsample_image(target_image, factor))
        state, displacement, history, final_loss = _run_level(
            atlas, target, base, steps, settings, level_window(settings.ncc_window, factor))
        state = tf.transpose(state, [1, 2, 3, 0])
        displacement, state_factor = tf.transpose(displacement, [1, 2, 3, 0]), factor
        histories.append(history)
        steps_run.append(len(history))
        seconds.append(time.perf_counter() - clock)
    field = np.asarray(displacement, np.float32)
    return RefineResult(field, factor, tuple(histories), final_loss, tuple(seconds),
                        tuple(steps_run), folding_fraction(field), settings)


def _refine_pair(atlas_image, target_image, initial_field, initial_backward, atlas_labels,
                 state_factor: int, settings: RefineSettings) -> RefineResult:
    """:func:`refine_field` for the ``ltnet`` objective: both fields, level by level."""
    from ltnet_keras.inference import refine_cycle
    if settings.start == "zero":
        initial_backward = np.zeros_like(initial_field)
    elif initial_backward is None:
        initial_backward = refine_cycle.approximate_inverse(initial_field)
    initial_backward = np.asarray(initial_backward, np.float32)
    if initial_backward.shape != initial_field.shape:
        raise ValueError(f"initial backward field {initial_backward.shape} must have the forward "
                         f"field's shape {initial_field.shape}")
    uses_labels = settings.cycle.anatomy_cycle or settings.cycle.anatomy_difference
    if uses_labels and atlas_labels is None:
        raise ValueError("the label terms (Eq. 9, 10) need the atlas' label crop")
    label_count = len(np.unique(atlas_labels)) if uses_labels else 1
    forward, backward = tf.constant(initial_field), tf.constant(initial_backward)
    histories, seconds, residual = [], [], None
    final_loss, factor = float("nan"), state_factor
    for factor, steps in settings.levels:
        clock = time.perf_counter()
        shape = tuple(n // factor for n in atlas_image.shape)
        level = refine_cycle.make_level(
            downsample_image(atlas_image, factor), downsample_image(target_image, factor),
            refine_cycle.level_labels(atlas_labels if uses_labels else None, factor, shape),
            level_window(settings.ncc_window, factor), label_count)
        base_f, base_b = (tf.transpose(resample_field(f, state_factor, factor, shape),
                                       [3, 0, 1, 2]) for f in (forward, backward))
        forward, backward, residual, history, final_loss = refine_cycle.run_pair_level(
            level, base_f, base_b, steps, settings.cycle, settings.regularizer_weight,
            settings.smoothing_passes, settings.learning_rate)
        forward, backward = (tf.transpose(f, [1, 2, 3, 0]) for f in (forward, backward))
        state_factor = factor
        histories.append(history)
        seconds.append(time.perf_counter() - clock)
    field = np.asarray(forward, np.float32)
    return RefineResult(field, factor, tuple(histories), final_loss, tuple(seconds),
                        tuple(len(h) for h in histories), folding_fraction(field), settings,
                        np.asarray(backward, np.float32),
                        refine_cycle.inverse_consistency_mm(residual, factor))
