"""LT-Net's reversible correspondence at test time (``--refine-objective ltnet``): the forward
field ``F`` and the backward field ``B`` refined together, with the paper's cycle terms.

Both fields live on one level's grid (the atlas and target crops have one shape), in level
voxels, pull convention: ``F`` on the target's grid (``atlas(p + F(p))`` faces ``target(p)``,
Eq. 1), ``B`` on the atlas' grid (``target(s + B(s))`` faces ``atlas(s)``, Eq. 5 with the
target in place of ``u_bar``). The round trips are the compositions ::

    E_F(p) = F(p) + B(p + F(p))      target -> atlas -> target   (Eq. 8's residual)
    E_B(s) = B(s) + F(s + B(s))      atlas -> target -> atlas    (l_bar = l(s + E_B(s)), Eq. 7)

and the objective (every weight in :class:`CycleWeights`, 0 switches a term off)::

    - NCC(target, atlas o F) - w_sim_b NCC(atlas, target o B)                 (Sec. 3, both ways)
    + w_smooth (diffusion(F) + diffusion(B))                                   (Eq. 6)
    + w_cyc (rho(atlas o (p + E_B) - atlas) + rho(target o (p + E_F) - target))   (Eq. 7)
    + w_trans (rho(E_F) + rho(E_B))                                            (Eq. 8)
    + w_anat (1 - Dice(l, l o (p + E_B)))                                      (Eq. 9)
    + w_diff rho(|l - u_bar| - |u_bar - l_bar|)                                (Eq. 10)

with ``rho`` the paper's Charbonnier penalty and ``l`` the atlas' labels. Eq. 7 is the paper's
atlas cycle plus its mirror through the target (the scan has no labels, so Eq. 9-10 stay on the
atlas side). Gradients are written out. In a composition only the *outer* field's positions
carry the gradient: each field is pulled towards the inverse of the other, which is held fixed
within the step (block coordinate descent; both compositions are penalised, so each field gets
its own pull). That keeps every step free of scatters, which XLA runs serially on a CPU.

The label terms never build a ``(voxels, labels)`` map: a voxel's warped one-hot labels are the
weights of the 8 corners of its cell grouped by the corners' labels, so the Dice sums of Eq. 9
and the per-label penalties of Eq. 10 are computed from 8 (or 17) labels per voxel.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from ltnet_keras.models import trilinear
from ltnet_keras.inference.programs import compiled
from ltnet_keras.inference.refine_equations import (
    adam_update, cells, corner_table, diffusion_and_gradient, ncc_and_gradient, smooth,
    smooth_transpose, target_sums, warp_and_derivative)

#: Eq. 8's penalty: rho(x) = (x^2 + eps^2)^gamma with the paper's eps = 0.001, gamma = 0.45.
TRANS_EPSILON, TRANS_GAMMA = 0.001, 0.45
#: Eq. 7's L1, made differentiable at 0: (x^2 + eps^2)^(1/2) with eps small on normalised images.
CYCLE_EPSILON, CYCLE_GAMMA = 0.01, 0.5


@dataclass(frozen=True)
class CycleWeights:
    """Weights of the terms of the test-time LT-Net objective (module docstring); the
    diffusion weight is ``RefineSettings.regularizer_weight``, shared with the plain objective.

    Defaults: the best of the grid on validation subjects S31-S33
    (``results/refine_ltnet/tune``): a weak coupling; stronger ones lost Dice (Eq. 8 at 5:
    -2.2 points against the plain objective)."""
    backward_similarity: float = 1.0   # NCC(atlas, target o B)
    image_cycle: float = 0.1           # Eq. 7
    transformation: float = 0.1        # Eq. 8
    anatomy_cycle: float = 0.0         # Eq. 9
    anatomy_difference: float = 0.0    # Eq. 10

    def __post_init__(self):
        for name, value in self.to_dict().items():
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise ValueError(f"cycle weight {name} must be a finite number >= 0, "
                                 f"not {value!r}")

    def to_dict(self) -> dict:
        return {"backward_similarity": self.backward_similarity,
                "image_cycle": self.image_cycle, "transformation": self.transformation,
                "anatomy_cycle": self.anatomy_cycle,
                "anatomy_difference": self.anatomy_difference}

    def without(self, term: str) -> "CycleWeights":
        """The same weights with ``term`` switched off (an ablation row)."""
        values = self.to_dict()
        if term not in values:
            raise ValueError(f"unknown cycle term {term!r}; terms: {', '.join(values)}")
        values[term] = 0.0
        return CycleWeights(**values)


# -------------------------------------------------------------------------- the equations
def charbonnier_and_derivative(x, epsilon: float, gamma: float):
    """``rho(x) = (x^2 + eps^2)^gamma`` and ``rho'(x) = 2 gamma x (x^2 + eps^2)^(gamma - 1)``,
    element-wise (Eq. 8's penalty; ``exp(gamma log)`` vectorises where ``pow`` does not)."""
    log_base = tf.math.log(x * x + epsilon * epsilon)
    return tf.exp(gamma * log_base), 2.0 * gamma * x * tf.exp((gamma - 1.0) * log_base)


def corner_weights(cell):
    """The 8 corner weights ``(x, y, z, 8)`` of a cell (:func:`~ltnet_keras.inference.
    refine_equations.cells`) in
    :data:`~ltnet_keras.models.trilinear.CORNERS` order and their derivatives with respect to
    the displacement ``(3, x, y, z, 8)``: ``sum(weights * corners)`` is the warp."""
    _, lower, slope = cell
    along = [((lower[a], 1.0 - lower[a]), (-slope[a], slope[a])) for a in range(3)]
    weights, d_weights = [], [[], [], []]
    for corner in trilinear.CORNERS:
        w = [along[a][0][c] for a, c in enumerate(corner)]
        weights.append(w[0] * w[1] * w[2])
        for a in range(3):
            factors = [along[b][1][c] if b == a else w[b] for b, c in enumerate(corner)]
            d_weights[a].append(factors[0] * factors[1] * factors[2])
    return tf.stack(weights, -1), tf.stack([tf.stack(d, -1) for d in d_weights])


def sample(tables, field):
    """Values ``(C, x, y, z)`` and derivatives ``(C, 3, x, y, z)`` with respect to ``field``
    of ``C`` volumes given by their corner tables (:func:`~ltnet_keras.inference.
    refine_equations.corner_table`) at ``p + field``. A gather per volume: one gather of
    ``(voxels, 8, C)`` values, or a channels-last table, measured 2x slower on a CPU."""
    warped = [warp_and_derivative(table, field) for table in tables]
    return tf.stack([w[0] for w in warped]), tf.stack([w[1] for w in warped])


def field_tables(field):
    """The corner tables of the 3 components of ``field`` ``(3, x, y, z)``."""
    return tuple(corner_table(component) for component in tf.unstack(field))


def through_composition(gradient, jacobian):
    """``(I + J)^T g``: a gradient ``(3, x, y, z)`` with respect to a composition ``u + v(p +
    u)`` carried to ``u``, ``jacobian[i, j] = d v_i / d x_j`` at ``p + u`` ``(3, 3, x, y, z)``."""
    return gradient + tf.reduce_sum(jacobian * gradient[:, None], 0)


def anatomy_cycle(atlas_labels, cycle_labels, cycle_weights):
    """Eq. 9, ``1 - 2 sum l l_bar / (sum l^2 + sum l_bar^2)`` over the atlas' structures
    (background, label 0, left out), with ``l_bar = l o (s + E_B)`` given by its cell: the
    corner labels ``(x, y, z, 8)`` and weights. Returns the loss and its gradient with
    respect to the weights."""
    with tf.GradientTape() as tape:
        tape.watch(cycle_weights)
        inside = tf.cast(atlas_labels > 0, tf.float32)
        same = tf.cast(tf.equal(cycle_labels, atlas_labels[..., None]), tf.float32)
        overlap = tf.reduce_sum(inside[..., None] * same * cycle_weights)
        pairs = tf.cast(tf.equal(cycle_labels[..., :, None], cycle_labels[..., None, :]),
                        tf.float32) * tf.cast(cycle_labels > 0, tf.float32)[..., None]
        squares = tf.reduce_sum(cycle_weights[..., :, None] * pairs
                                * cycle_weights[..., None, :])
        loss = 1.0 - 2.0 * overlap / (tf.reduce_sum(inside) + squares + 1e-6)
    return loss, tape.gradient(loss, cycle_weights)


def anatomy_difference(atlas_labels, warped_labels, warped_weights, cycle_labels,
                       cycle_weights, label_count: int):
    """Eq. 10, the mean over voxels and the ``label_count`` one-hot channels of ``rho(|l -
    u_bar| - |u_bar - l_bar|)`` less its value for three equal maps, from the cells of
    ``u_bar = l o (p + F)`` and ``l_bar = l o (s + E_B)``: only the (at most 17) labels among
    ``l``'s and the 16 corners' can differ from ``rho(0)``. Returns the loss and its gradients
    with respect to both cells' weights."""
    with tf.GradientTape() as tape:
        tape.watch([warped_weights, cycle_weights])
        candidates = tf.concat([atlas_labels[..., None], warped_labels, cycle_labels], -1)
        first = tf.logical_not(tf.reduce_any(tf.logical_and(
            tf.equal(candidates[..., :, None], candidates[..., None, :]),
            tf.linalg.band_part(tf.ones((17, 17), tf.bool), 0, -1)[None, None, None]
            & ~tf.eye(17, dtype=tf.bool)[None, None, None]), axis=-2))

        def channel(labels, weights):    # each candidate's channel of a warped one-hot map
            return tf.reduce_sum(tf.cast(tf.equal(candidates[..., :, None], labels[..., None, :]),
                                         tf.float32) * weights[..., None, :], -1)
        atlas = tf.cast(tf.equal(candidates, atlas_labels[..., None]), tf.float32)
        warped, cycled = channel(warped_labels, warped_weights), channel(cycle_labels,
                                                                         cycle_weights)
        penalty, _ = charbonnier_and_derivative(tf.abs(atlas - warped) - tf.abs(warped - cycled),
                                                TRANS_EPSILON, TRANS_GAMMA)
        floor = (TRANS_EPSILON ** 2) ** TRANS_GAMMA
        loss = (tf.reduce_sum(tf.cast(first, tf.float32) * (penalty - floor))
                / float(np.prod(atlas_labels.shape) * label_count))
    return (loss, *tape.gradient(loss, [warped_weights, cycle_weights]))


# -------------------------------------------------------------------------- compiled pieces
@compiled
def _states(base_f, delta_f, base_b, delta_b, passes):
    return base_f + smooth(delta_f, passes), base_b + smooth(delta_b, passes)


@compiled
def _round_trip(field, moving_table, own_table, own_image, other_field, cycle_weight,
                trans_weight):
    """One side of the cycle, for ``field`` (``F`` on the target's grid, or ``B`` on the
    atlas'): the moving image warped (and its derivative), the round trip ``E = field +
    other(p + field)``, Eq. 7's and Eq. 8's penalties on this side and their gradient carried
    to ``field`` through ``(I + J_other)^T``; also ``J_other`` at ``p + field`` (the label
    terms carry their gradient through it)."""
    voxels = float(np.prod(field.shape[1:]))
    warped, d_warped = warp_and_derivative(moving_table, field)
    # The other field's corner tables are made here: in one program with the warp XLA
    # writes them no more than once (as separate outputs: ~9x the warp's time, measured).
    other, jacobian = sample(field_tables(other_field), field)
    residual = field + other
    trans, d_trans = charbonnier_and_derivative(residual, TRANS_EPSILON, TRANS_GAMMA)
    back, d_back = warp_and_derivative(own_table, residual)
    cycle, d_cycle = charbonnier_and_derivative(back - own_image, CYCLE_EPSILON, CYCLE_GAMMA)
    d_residual = (trans_weight * d_trans / (3.0 * voxels)
                  + cycle_weight * d_cycle[None] * d_back / voxels)
    loss = trans_weight * tf.reduce_mean(trans) + cycle_weight * tf.reduce_mean(cycle)
    return (warped, d_warped, residual, loss, through_composition(d_residual, jacobian),
            jacobian)


@compiled
def _label_terms(atlas_labels, label_table, forward, round_trip, jacobian, label_count,
                 anatomy_weight, difference_weight):
    """Eq. 9 and 10 and their gradients with respect to ``F`` (through ``u_bar``'s cell) and
    ``B`` (through ``l_bar``'s cell at ``s + E_B``, carried by ``(I + J_F)^T``)."""
    warped_cell, cycle_cell = cells(forward), cells(round_trip)
    warped_labels = tf.gather(label_table, warped_cell[0])
    cycle_labels = tf.gather(label_table, cycle_cell[0])
    warped_weights, warped_d_weights = corner_weights(warped_cell)
    cycle_weights, cycle_d_weights = corner_weights(cycle_cell)
    anatomy, d_cycle = anatomy_cycle(atlas_labels, cycle_labels, cycle_weights)
    difference, d_warped, d_cycle_diff = anatomy_difference(
        atlas_labels, warped_labels, warped_weights, cycle_labels, cycle_weights, label_count)
    d_cycle = anatomy_weight * d_cycle + difference_weight * d_cycle_diff
    gradient_f = difference_weight * tf.reduce_sum(warped_d_weights * d_warped[None], -1)
    gradient_e = tf.reduce_sum(cycle_d_weights * d_cycle[None], -1)
    return (anatomy_weight * anatomy + difference_weight * difference, gradient_f,
            through_composition(gradient_e, jacobian))


@compiled
def _ncc_piece(target, sums, warped, window):
    return ncc_and_gradient(target, warped, window, sums)


@compiled
def _side_gradient(field, similarity, d_similarity, d_warped, round_trip_gradient,
                   label_gradient, similarity_weight, smooth_weight, passes):
    """The loss of one field's own terms and the gradient of everything with respect to its
    update (before smoothing)."""
    regulariser, d_field = diffusion_and_gradient(field)
    gradient = (-similarity_weight * d_similarity[None] * d_warped + smooth_weight * d_field
                + round_trip_gradient + label_gradient)
    return (-similarity_weight * similarity + smooth_weight * regulariser,
            smooth_transpose(gradient, passes))


@compiled
def _adam_pair(delta_f, m_f, v_f, gradient_f, delta_b, m_b, v_b, gradient_b, step, rate):
    return (*adam_update(delta_f, m_f, v_f, gradient_f, step, rate),
            *adam_update(delta_b, m_b, v_b, gradient_b, step, rate))


@compiled
def _tables(atlas, target, atlas_labels):
    return corner_table(atlas), corner_table(target), corner_table(atlas_labels)


# -------------------------------------------------------------------------- one level
@dataclass
class Level:
    """What a level's steps share: the images, their tables and NCC sums, the labels."""
    atlas: tf.Tensor
    target: tf.Tensor
    atlas_table: tf.Tensor
    target_table: tf.Tensor
    atlas_sums: tf.Tensor
    target_sums: tf.Tensor
    labels: tf.Tensor
    label_table: tf.Tensor
    label_count: int
    window: int


def make_level(atlas, target, labels, window: int, label_count: int) -> Level:
    """A level's :class:`Level` from its images and labels ``(x, y, z)`` (numpy), the NCC
    window (voxels) and the atlas' label count (Eq. 10's channels)."""
    atlas, target = tf.constant(atlas), tf.constant(target)
    labels = tf.constant(np.asarray(labels, np.int32))
    atlas_table, target_table, label_table = _tables(atlas, target, labels)
    return Level(atlas, target, atlas_table, target_table, _target_sums(atlas, window),
                  _target_sums(target, window), labels, label_table, label_count, window)


_target_sums = compiled(target_sums)


def pair_loss_and_gradients(level: Level, forward, backward, weights: CycleWeights,
                            smooth_weight: float, passes: int) -> Tuple:
    """The objective at fields ``forward``, ``backward`` ``(3, x, y, z)`` and its gradients
    with respect to their (smoothed) updates; also the forward round trip ``E_F``."""
    w = {k: tf.constant(v, tf.float32) for k, v in weights.to_dict().items()}
    (warped_f, d_warped_f, residual_f, loss_f, trip_f, _) = _round_trip(
        forward, level.atlas_table, level.target_table, level.target, backward,
        w["image_cycle"], w["transformation"])
    (warped_b, d_warped_b, residual_b, loss_b, trip_b, jacobian_b) = _round_trip(
        backward, level.target_table, level.atlas_table, level.atlas, forward,
        w["image_cycle"], w["transformation"])
    zero = tf.zeros_like(forward)
    label_loss, label_f, label_b = 0.0, zero, zero
    if weights.anatomy_cycle or weights.anatomy_difference:
        label_loss, label_f, label_b = _label_terms(
            level.labels, level.label_table, forward, residual_b, jacobian_b,
            level.label_count, w["anatomy_cycle"], w["anatomy_difference"])
    similarity_f, d_similarity_f = _ncc_piece(level.target, level.target_sums, warped_f,
                                              level.window)
    similarity_b, d_similarity_b = 0.0, tf.zeros_like(warped_b)
    if weights.backward_similarity:
        similarity_b, d_similarity_b = _ncc_piece(level.atlas, level.atlas_sums, warped_b,
                                                  level.window)
    smooth_w = tf.constant(smooth_weight, tf.float32)
    own_f, gradient_f = _side_gradient(forward, similarity_f, d_similarity_f, d_warped_f,
                                       trip_f, label_f, tf.constant(1.0), smooth_w, passes)
    own_b, gradient_b = _side_gradient(backward, similarity_b, d_similarity_b, d_warped_b,
                                       trip_b, label_b, w["backward_similarity"], smooth_w,
                                       passes)
    loss = float(own_f + own_b + loss_f + loss_b + label_loss)
    return loss, gradient_f, gradient_b, residual_f


def run_pair_level(level: Level, base_f, base_b, steps: int, weights: CycleWeights,
                   smooth_weight: float, passes: int, learning_rate: float):
    """Adam on both fields' updates for ``steps`` steps. Returns (forward, backward, the
    forward round trip, the loss before each step, the final loss)."""
    delta_f = m_f = v_f = tf.zeros_like(base_f)
    delta_b = m_b = v_b = tf.zeros_like(base_b)
    rate = tf.constant(learning_rate, tf.float32)
    history = []
    for k in range(steps):
        forward, backward = _states(base_f, delta_f, base_b, delta_b, passes)
        loss, gradient_f, gradient_b, _ = pair_loss_and_gradients(
            level, forward, backward, weights, smooth_weight, passes)
        delta_f, m_f, v_f, delta_b, m_b, v_b = _adam_pair(
            delta_f, m_f, v_f, gradient_f, delta_b, m_b, v_b, gradient_b,
            tf.constant(k + 1, tf.float32), rate)
        history.append(loss)
    forward, backward = _states(base_f, delta_f, base_b, delta_b, passes)
    loss, _, _, residual = pair_loss_and_gradients(level, forward, backward, weights,
                                                   smooth_weight, passes)
    return forward, backward, residual, np.array(history, np.float32), loss


def inverse_consistency_mm(residual, factor: int) -> float:
    """Mean length (mm, on 1 mm crops) of the forward round trip ``E_F`` ``(3, x, y, z)`` in
    level voxels of ``factor``: 0 when ``B`` inverts ``F`` exactly."""
    return float(np.mean(np.linalg.norm(np.asarray(residual), axis=0)) * factor)


def level_labels(labels: Optional[np.ndarray], factor: int, shape) -> np.ndarray:
    """The atlas' labels at a level: the label of each block's centre voxel (zeros if none)."""
    if labels is None:
        return np.zeros(shape, np.int32)
    start = factor // 2
    return np.asarray(labels[start::factor, start::factor, start::factor], np.int32)


def approximate_inverse(field: np.ndarray, iterations: int = 10) -> np.ndarray:
    """A backward field for a forward one ``(x, y, z, 3)`` (voxels, pull): the fixed point of
    ``B = -F(p + B)``, so that ``B(s) + F(s + B(s)) = 0``; the start of ``B`` when the run has
    no G_B (VoxelMorph)."""
    forward = tf.constant(np.asarray(field, np.float32)[None])
    backward = -forward
    for _ in range(iterations):
        backward = -trilinear.warp(forward, backward)
    return np.asarray(backward[0], np.float32)


class BackwardStart:
    """G_B as test time uses it: ``forward field (x, y, z, 3) -> backward field`` on the
    network grid, ``G_B([atlas o F, atlas])`` as in training (Eq. 5: the warped atlas moves
    back onto the atlas); ``None`` for a run without G_B (VoxelMorph). G_B is loaded on the
    first call, so a segmenter that never refines with ``ltnet`` never loads it.
    ``atlas_network_image``: the atlas on the network grid."""

    def __init__(self, weights_path, atlas_network_image: np.ndarray, network):
        self.weights_path, self.network = Path(weights_path), network
        self.atlas_network_image = np.asarray(atlas_network_image, np.float32)
        self._predict = None

    def _load(self):
        from ltnet_keras.models.generators import make_generator
        generator = make_generator(self.atlas_network_image.shape, self.network,
                                   "backward_generator")
        generator.load_weights(str(self.weights_path))
        atlas = tf.constant(self.atlas_network_image[None, ..., None])

        @tf.function(reduce_retracing=True, autograph=False)
        def predict(forward):
            warped = trilinear.warp(atlas, forward[None])
            return generator([warped, atlas], training=False)[0]
        return predict

    def __call__(self, forward) -> Optional[np.ndarray]:
        if not self.weights_path.exists():
            return None
        if self._predict is None:
            self._predict = self._load()
        return np.asarray(self._predict(tf.constant(np.asarray(forward, np.float32))))
