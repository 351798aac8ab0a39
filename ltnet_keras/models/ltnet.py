"""LT-Net (Fig. 2): forward/backward correspondence cycle trained with the losses of Eq. (3)-(11).

The same class trains every row of Tables 1-2: a loss term with weight 0 is not computed, and a
network that no active term needs (G_B, D) is not built.
"""
from typing import Dict

import tensorflow as tf

from ltnet_keras.losses import fused as fused_losses
from ltnet_keras.losses import equations as losses
from ltnet_keras.config import LossWeights, NetworkConfig, PenaltyConfig, TrainConfig
from ltnet_keras.models.discriminator import make_patchgan
from ltnet_keras.models import trilinear
from ltnet_keras.models.generators import make_generator, make_warp


def _guard_non_finite(gradients, loss):
    """Zero non-finite gradients so the weights stay finite, and make ``loss`` NaN instead.

    A finite loss can still have inf/NaN gradients; applying them would poison every later step
    (NaN fields crash the warp). The NaN loss lets the run monitor stop at this very step.
    """
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in gradients])
    safe = [tf.where(tf.math.is_finite(g), g, tf.zeros_like(g)) for g in gradients]
    return safe, tf.where(finite, loss, tf.fill(tf.shape(loss), float("nan")))


def gradient_gate(x, is_open):
    """``x`` in the forward pass; its gradient is multiplied by ``is_open`` (0. or 1.).

    Lets a schedule cut a path of the graph for some steps (freezing G_F, keeping the cycle
    terms away from G_F) without retracing or changing any loss value.
    """
    x_stopped = tf.stop_gradient(x)
    return x_stopped + is_open * (x - x_stopped)


def mean_displacement(field):
    """Mean length (voxels) of the displacement vectors of ``(batch, x, y, z, 3)``: ``(batch,)``."""
    return tf.reduce_mean(tf.norm(field, axis=-1), axis=[1, 2, 3])


# VoxelMorph's own terms are never ramped (``train.ramp_steps``).
UNRAMPED_TERMS = ("sim", "smooth")
# The terms the backward path feeds; ``train.cycle_backward_only_steps`` keeps them off G_F.
CYCLE_INPUTS = ("forward_field", "warped_atlas", "warped_atlas_labels")


class LTNet(tf.keras.Model):
    """G_F, G_B and D with a custom ``train_step`` alternating a G and a D update.

    Training data: dicts ``{"atlas": (b, x, y, z, 1), "atlas_labels": (b, x, y, z, C),
    "target": (b, x, y, z, 1)}`` (optionally ``"atlas_label_index": (b, x, y, z)``, the
    channel of each voxel's label, which saves the fast path reading it off) with one (atlas, unlabelled target) pair per replica. Calling the
    model on ``[atlas, target]`` returns the forward field ``(b, x, y, z, 3)``.

    ``fast_path`` (the default) computes the warps with :mod:`trilinear` and the label terms
    with :mod:`fused_losses`: the same mathematics at a fraction of the time and memory, but
    it needs one-hot atlas labels (as the data pipeline makes them; checked every step).
    ``fast_path=False`` is the straightforward path (voxelmorph's SpatialTransformer, the
    losses term by term), kept as the reference the fast path is tested against.
    """

    def __init__(self, inshape, network: NetworkConfig, weights: LossWeights,
                 penalties: PenaltyConfig = None, train: TrainConfig = None, name="ltnet",
                 fast_path: bool = True):
        super().__init__(name=name)
        self.fast_path = fast_path
        self.penalties = penalties or PenaltyConfig()
        self.schedule = train or TrainConfig()
        self.ramp_steps = int(self.schedule.ramp_steps)
        self.inshape = tuple(int(s) for s in inshape)
        self.term_weights: Dict[str, float] = {k: v for k, v in weights.terms().items() if v > 0}
        self.ncc_window = weights.ncc_window
        self.uses_labels = weights.needs_atlas_labels
        self.uses_direct_backward = weights.needs_direct_backward
        self.forward_generator = make_generator(self.inshape, network, "forward_generator")
        self.backward_generator = (make_generator(self.inshape, network, "backward_generator")
                                   if weights.needs_backward else None)
        self.discriminator = (make_patchgan(self.inshape, network)
                              if weights.needs_discriminator else None)
        # voxelmorph's SpatialTransformer fixes its channel count on first call: one per kind.
        self.warp_image = make_warp("linear", name="warp_image")
        self.warp_labels = make_warp("linear", name="warp_labels")
        tracked = list(self.term_weights) + ["total", "field_magnitude"]
        if self.discriminator is not None:
            tracked.append("discriminator")
        self.trackers = {n: tf.keras.metrics.Mean(name=n) for n in tracked}

    # -- Keras plumbing -----------------------------------------------------------------------
    def compile(self, generator_optimizer, discriminator_optimizer=None, **kwargs):
        super().compile(**kwargs)
        self.generator_optimizer = generator_optimizer
        self.discriminator_optimizer = discriminator_optimizer

    @property
    def metrics(self):
        # Listed here so Keras resets them at each epoch start and reads them replica-combined.
        return list(self.trackers.values())

    @property
    def generator_variables(self):
        networks = [self.forward_generator, self.backward_generator]
        return [v for net in networks if net is not None for v in net.trainable_variables]

    def build_optimizers(self):
        """Create optimiser slots now, so a checkpoint restores them before the first step."""
        self.generator_optimizer.build(self.generator_variables)
        if self.discriminator is not None:
            self.discriminator_optimizer.build(self.discriminator.trainable_variables)

    def call(self, inputs, training=False):
        atlas, target = inputs
        return self.forward_generator([atlas, target], training=training)

    # -- schedules (not in the paper; all off by default) --------------------------------------
    def _step(self):
        return self.generator_optimizer.iterations

    def _open_from(self, first_step: int):
        """1. from ``first_step`` on (counting generator updates from 0), 0. before."""
        return tf.cast(self._step() >= first_step, tf.float32)

    def _real_for_discriminator(self, target):
        """The real scans D sees: as they are, or (``train.discriminator_resample_real``)
        resampled once at a random constant sub-voxel shift per example."""
        if not self.schedule.discriminator_resample_real:
            return target
        batch = tf.shape(target)[0]
        shift = tf.random.uniform(tf.stack([batch, 1, 1, 1, 3]), -0.5, 0.5)
        return self.warp_image([target, tf.zeros_like(target[..., :1]) + shift])

    def _discriminator_view(self, images):
        """What D sees: the images plus instance noise (``train.instance_noise``), if any."""
        noise = self.schedule.instance_noise
        if not noise:
            return images
        return images + tf.random.normal(tf.shape(images), stddev=noise)

    # -- the method ---------------------------------------------------------------------------
    def correspondence_cycle(self, atlas, atlas_labels, target, training=False,
                             atlas_label_index=None):
        """Forward path (Eq. 1, 2) and, when needed, backward path (Eq. 5 and l_bar_s).

        ``out["cycle_inputs"]`` holds the forward-path tensors as the cycle terms see them:
        the same values, with their gradient to G_F cut during ``cycle_backward_only_steps``.
        ``atlas_label_index``: the label channel of every atlas voxel ``(b, x, y, z)``, if
        known (the data pipeline gives it); else the fast path reads it off ``atlas_labels``.
        """
        forward_field = self._generate(self.forward_generator, atlas, target, training)
        if self.schedule.freeze_forward_steps:
            forward_field = gradient_gate(forward_field,
                                          self._open_from(self.schedule.freeze_forward_steps))
        out = {"forward_field": forward_field}
        if self.fast_path:
            out["forward_corners"] = trilinear.corner_table(forward_field)
        out["warped_atlas"] = self._warp_image(atlas, forward_field, out.get("forward_corners"))
        if self.uses_labels:
            out["warped_atlas_labels"], out["atlas_label_index"] = self._warp_atlas_labels(
                atlas_labels, atlas_label_index, forward_field, out.get("forward_corners"))
        if self.backward_generator is None:
            return out
        seen = {name: out[name] for name in CYCLE_INPUTS if name in out}
        if self.schedule.cycle_backward_only_steps:
            is_open = self._open_from(self.schedule.cycle_backward_only_steps)
            seen = {name: gradient_gate(value, is_open) for name, value in seen.items()}
        out["cycle_inputs"] = seen
        backward_field = self._generate(self.backward_generator, seen["warped_atlas"], atlas,
                                        training)
        out["backward_field"] = backward_field
        if self.fast_path:
            out["backward_corners"] = trilinear.corner_table(backward_field)
        if self.uses_direct_backward:
            out.update(self.direct_backward(atlas, target, training))
        if self.penalties.reconstruction == "composed":
            # l o dp_F o dp_B in one resampling (see PenaltyConfig): dp_F is read at
            # t + dp_B(t), the backward field's sample points.
            round_trip = losses.compose_fields(
                backward_field, seen["forward_field"],
                warp=self._warp_along(out.get("backward_corners")))
            corners = trilinear.corner_table(round_trip) if self.fast_path else None
            out["reconstructed_atlas"] = self._warp_image(atlas, round_trip, corners)
            if self.uses_labels:
                out["reconstructed_atlas_labels"], _ = self._warp_atlas_labels(
                    atlas_labels, out.get("atlas_label_index"), round_trip, corners)
            return out
        out["reconstructed_atlas"] = self._warp_image(seen["warped_atlas"], backward_field,
                                                      out.get("backward_corners"))
        if self.uses_labels:
            out["reconstructed_atlas_labels"] = self._rewarp_atlas_labels(out)
        return out

    def direct_backward(self, atlas, target, training=False):
        """Not in the paper: G_B registers the scan itself to the atlas, ``G_B(u, l)``.

        Returns ``direct_backward_field`` and ``inverse_warped_target`` (``u`` pulled onto the
        atlas' grid by it), which the extension terms ``inverse_sim`` and ``inverse_trans``
        score (see :class:`~ltnet_keras.config.LossWeights`).
        """
        field = self._generate(self.backward_generator, target, atlas, training)
        corners = trilinear.corner_table(field) if self.fast_path else None
        return {"direct_backward_field": field,
                "inverse_warped_target": self._warp_image(target, field, corners)}

    def _generate(self, generator, moving, fixed, training):
        """``generator([moving, fixed])``; with ``train.recompute_generators`` its activations
        are recomputed for the backward pass instead of kept (same values and gradients)."""
        if not self.schedule.recompute_generators:
            return generator([moving, fixed], training=training)
        return tf.recompute_grad(lambda m, f: generator([m, f], training=training))(moving, fixed)

    # -- the warps, straightforward (voxelmorph's layer) or fast (shared corner tables) --------
    def _warp_image(self, image, field, corners):
        if not self.fast_path:
            return self.warp_image([image, field])
        return trilinear.warp(image, field, corners)

    def _warp_atlas_labels(self, atlas_labels, label_index, field, corners):
        """``atlas_labels`` warped by ``field`` (``u_bar_s``, Eq. 2, for the forward field), and
        the atlas' label index (``None`` on the straightforward path)."""
        if not self.fast_path:
            return self.warp_labels([atlas_labels, field]), None
        if label_index is None:
            label_index, is_one_hot = fused_losses.one_hot_index(atlas_labels)
            with tf.control_dependencies([tf.debugging.Assert(is_one_hot, [
                    "atlas_labels must be one-hot on LTNet's fast path (fast_path=False "
                    "warps any label map)"])]):
                label_index = tf.identity(label_index)
        warped = trilinear.warp_one_hot(label_index, field, atlas_labels.shape[-1], corners)
        return warped, label_index

    def _rewarp_atlas_labels(self, out):
        """``l_bar_s``: the cycle's warped labels warped back by the backward field."""
        seen, backward_field = out["cycle_inputs"], out["backward_field"]
        if not self.fast_path:
            return self.warp_labels([seen["warped_atlas_labels"], backward_field])
        # The gradient through u_bar_s reaches G_F via the (gated) forward field here.
        return trilinear.rewarp_one_hot(out["atlas_label_index"], seen["warped_atlas_labels"],
                                        seen["forward_field"], backward_field,
                                        out["forward_corners"], out["backward_corners"])

    def generator_terms(self, cycle, atlas, atlas_labels, target):
        """Per-example value, shape ``(batch,)``, of every active term of Eq. (11)."""
        active = self.term_weights
        penalties = self.penalties
        seen = cycle.get("cycle_inputs", {})
        terms = {}
        if "sim" in active:
            terms["sim"] = losses.similarity_loss(target, cycle["warped_atlas"], self.ncc_window)
        if "smooth" in active:
            terms["smooth"] = losses.smoothness_loss(cycle["forward_field"])
            if "backward_field" in cycle:  # Eq. (6)
                terms["smooth"] += losses.smoothness_loss(cycle["backward_field"])
            if "direct_backward_field" in cycle:  # the same regulariser on G_B's own output
                terms["smooth"] += losses.smoothness_loss(cycle["direct_backward_field"])
        if "gan" in active:
            terms["gan"] = losses.lsgan_generator_loss(
                self.discriminator(self._discriminator_view(cycle["warped_atlas"])))
        if "cyc" in active:
            terms["cyc"] = losses.image_cycle_loss(atlas, cycle["reconstructed_atlas"],
                                                   penalties.cyc_eps, penalties.cyc_gamma)
        if "trans" in active:
            terms["trans"] = losses.transformation_consistency_loss(
                seen["forward_field"], cycle["backward_field"], penalties.trans_eps,
                penalties.trans_gamma, warp=self._field_warp(cycle))
        if "inverse_sim" in active:
            terms["inverse_sim"] = losses.similarity_loss(atlas, cycle["inverse_warped_target"],
                                                          self.ncc_window)
        if "inverse_trans" in active:
            # Eq. (8)'s composition and penalty, with G_B's field of the scan itself.
            terms["inverse_trans"] = losses.transformation_consistency_loss(
                seen["forward_field"], cycle["direct_backward_field"], penalties.trans_eps,
                penalties.trans_gamma, warp=self._field_warp(cycle))
        label_terms = {"anatomy_cyc", "diff_cyc"} & set(active)
        if label_terms and self.fast_path:
            fused = fused_losses.label_cycle_terms(
                cycle["atlas_label_index"], seen["warped_atlas_labels"],
                cycle["reconstructed_atlas_labels"], penalties.diff_eps, penalties.diff_gamma)
            terms.update({name: fused[name] for name in label_terms})
        elif label_terms:
            if "anatomy_cyc" in active:
                terms["anatomy_cyc"] = losses.anatomy_cycle_loss(
                    atlas_labels, cycle["reconstructed_atlas_labels"])
            if "diff_cyc" in active:
                terms["diff_cyc"] = losses.anatomy_difference_loss(
                    atlas_labels, seen["warped_atlas_labels"],
                    cycle["reconstructed_atlas_labels"], penalties.diff_eps,
                    penalties.diff_gamma)
        return terms

    def _field_warp(self, cycle):
        """How Eq. (8) resamples dp_B at ``t + dp_F(t)``: voxelmorph's layer, or on the fast
        path :func:`trilinear.warp` with the forward field's corners."""
        return self._warp_along(cycle.get("forward_corners"))

    def _warp_along(self, corners):
        """``warp(moving, field)`` for :func:`losses.compose_fields`: ``None`` (voxelmorph's
        layer) on the straightforward path, else :func:`trilinear.warp` with the corner table
        of that field, computed once and shared."""
        if not self.fast_path:
            return None
        return lambda moving, field: trilinear.warp(moving, field, corners)

    def current_weights(self):
        """Eq. (11) weights, with the non-VoxelMorph terms scaled by the ramp (if any)."""
        if not self.ramp_steps:
            return self.term_weights
        step = tf.cast(self._step(), tf.float32)
        scale = tf.minimum(1.0, step / float(self.ramp_steps))
        return {name: weight if name in UNRAMPED_TERMS else weight * scale
                for name, weight in self.term_weights.items()}

    def _replica_mean(self, per_example):
        """Mean over the global batch, so summing gradients over replicas gives the mean."""
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        global_batch = tf.shape(per_example)[0] * replicas
        return tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)

    def _record(self, terms, total, cycle, discriminator_loss=None):
        for name, value in terms.items():
            self.trackers[name].update_state(value)
        self.trackers["total"].update_state(total)
        self.trackers["field_magnitude"].update_state(mean_displacement(cycle["forward_field"]))
        if discriminator_loss is not None:
            self.trackers["discriminator"].update_state(discriminator_loss)
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def train_step(self, data):
        atlas, atlas_labels, target = data["atlas"], data["atlas_labels"], data["target"]

        with tf.GradientTape() as tape:
            cycle = self.correspondence_cycle(atlas, atlas_labels, target, training=True,
                                              atlas_label_index=data.get("atlas_label_index"))
            terms = self.generator_terms(cycle, atlas, atlas_labels, target)
            total = losses.total_generator_loss(terms, self.current_weights())
            generator_loss = self._replica_mean(total)
        variables = self.generator_variables
        gradients, total = _guard_non_finite(tape.gradient(generator_loss, variables), total)
        self.generator_optimizer.apply_gradients(zip(gradients, variables))

        discriminator_loss = None
        if self.discriminator is not None:
            # D sees the warped atlas of this step as a fixed sample (G was just updated).
            fake = tf.stop_gradient(cycle["warped_atlas"])
            with tf.GradientTape() as tape:
                discriminator_loss = losses.lsgan_discriminator_loss(
                    self.discriminator(self._discriminator_view(
                        self._real_for_discriminator(target)), training=True),
                    self.discriminator(self._discriminator_view(fake), training=True),
                    real_target=1.0 - self.schedule.label_smoothing)
                replica_loss = self._replica_mean(discriminator_loss)
            d_variables = self.discriminator.trainable_variables
            d_gradients, discriminator_loss = _guard_non_finite(
                tape.gradient(replica_loss, d_variables), discriminator_loss)
            self.discriminator_optimizer.apply_gradients(zip(d_gradients, d_variables))
        return self._record(terms, total, cycle, discriminator_loss)

    def test_step(self, data):
        atlas, atlas_labels, target = data["atlas"], data["atlas_labels"], data["target"]
        cycle = self.correspondence_cycle(atlas, atlas_labels, target)
        terms = self.generator_terms(cycle, atlas, atlas_labels, target)
        total = losses.total_generator_loss(terms, self.term_weights)
        return self._record(terms, total, cycle)

    # -- diagnostics ----------------------------------------------------------------------------
    def field_gradient_norms(self, atlas, atlas_labels, target) -> Dict[str, tf.Tensor]:
        """How hard each active term pulls on the forward field, for one batch.

        ``grad_<term>``: the L2 norm (over the whole field) of the gradient of that term, as it
        enters Eq. (11) (weighted, batch-averaged, ramp applied), with respect to the forward
        field ``dp_F``: every path counts (through the warps, G_B's input and D), exactly as G_F
        receives it, so a term cut off from G_F by a schedule reports 0. Also
        ``field_magnitude``: the mean displacement length in voxels. Call it on a fixed pair to
        compare terms over training (``train.log_grad_norms``).
        """
        weights = self.current_weights()
        with tf.GradientTape(persistent=True) as tape:
            cycle = self.correspondence_cycle(atlas, atlas_labels, target)
            terms = self.generator_terms(cycle, atlas, atlas_labels, target)
            weighted = {name: tf.reduce_mean(weights[name] * value)
                        for name, value in terms.items()}
        norms = {}
        for name, value in weighted.items():
            gradient = tape.gradient(value, cycle["forward_field"])
            norms[f"grad_{name}"] = (tf.constant(0.0) if gradient is None
                                     else tf.norm(gradient))
        del tape
        norms["field_magnitude"] = tf.reduce_mean(mean_displacement(cycle["forward_field"]))
        return norms
