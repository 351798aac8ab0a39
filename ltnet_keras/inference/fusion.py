"""Label fusion for multi-atlas segmentation: per-voxel majority vote and joint label fusion.

Both take label maps already warped onto one target grid (``(x, y, z)`` arrays) and return one
fused label map on that grid. Numpy and scipy only, apart from :func:`joint_label_fusion`,
which runs ANTs' ``antsJointFusion`` (loaded lazily, with one ITK thread, see
``ltnet_keras.data.align.load_ants``).
"""
import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["majority_vote", "JointFusionSettings", "joint_label_fusion", "fusion_region"]

JLF_METRICS = ("MSQ", "PC")


def _check_maps(label_maps, what="label maps") -> list:
    maps = [np.asarray(m) for m in label_maps]
    if not maps:
        raise ValueError(f"label fusion needs at least one of the {what}")
    shape = maps[0].shape
    for m in maps[1:]:
        if m.shape != shape:
            raise ValueError(f"{what} must share one shape; got {shape} and {m.shape}")
    return maps


#: Voxels per block of :func:`majority_vote` (its temporaries stay a few MB).
VOTE_BLOCK = 1 << 20


def majority_vote(label_maps: Sequence[np.ndarray]) -> np.ndarray:
    """Per-voxel majority vote of label maps of one shape.

    Each voxel takes the label carried by the most maps; a tie goes to the label of the
    earliest map among the tied ones, so the order of ``label_maps`` is the tie-break priority
    (put the most trusted atlas first). One map is returned unchanged. The result has the
    maps' common dtype (``np.result_type``).

    Only voxels where the maps disagree are voted on (most of a brain-sized grid is background
    or unanimous): block by block, the disagreeing voxels are gathered and each map's label
    there is counted against the later maps' (k(k-1)/2 comparisons over those voxels only).
    """
    maps = _check_maps(label_maps)
    if len(maps) == 1:
        return maps[0].copy()
    # One flat voxel order for all: the first map's memory order (views, no copies, when the
    # maps share it, as the outputs of one segmenter do).
    order = "F" if maps[0].flags.f_contiguous and not maps[0].flags.c_contiguous else "C"
    flat = [m.ravel(order=order) for m in maps]
    result = np.array(maps[0], dtype=np.result_type(*maps), order=order)   # a copy
    fused = result.ravel(order=order)   # a view of it
    differs = np.empty(min(VOTE_BLOCK, fused.size), dtype=bool)
    scratch = np.empty_like(differs)
    for start in range(0, fused.size, VOTE_BLOCK):
        block = slice(start, min(start + VOTE_BLOCK, fused.size))
        size = block.stop - block.start
        np.not_equal(flat[1][block], flat[0][block], out=differs[:size])
        for labels in flat[2:]:
            np.not_equal(labels[block], flat[0][block], out=scratch[:size])
            differs[:size] |= scratch[:size]
        where = np.flatnonzero(differs[:size])
        if where.size == 0:
            continue
        votes = np.stack([labels[block][where] for labels in flat]).astype(result.dtype,
                                                                            copy=False)
        counts = np.ones(votes.shape, dtype=np.int16)   # every map agrees with itself
        for i in range(len(maps)):
            for j in range(i + 1, len(maps)):
                same = votes[i] == votes[j]
                counts[i] += same
                counts[j] += same
        best = np.argmax(counts, axis=0)          # first maximum: the earliest map wins ties
        fused[start + where] = votes[best, np.arange(where.size)]
    return result


@dataclass
class JointFusionSettings:
    """How :func:`joint_label_fusion` runs ANTs' ``antsJointFusion``.

    ``patch_radius`` (voxels): the patches whose intensity differences to the target give the
    atlases' joint error (Wang et al. 2013, Eq. 7); ``search_radius`` (voxels): the local search
    for the best-matching atlas patch (their Sec. 4.1); ``beta``: exponent of the patch
    differences; ``rho``: ridge added to the diagonal of the joint error matrix (ANTs' alpha);
    ``metric``: patch similarity for the search, mean squares ("MSQ") or Pearson ("PC");
    ``nonnegative``: solve for non-negative weights. ``beta``, ``rho`` and ``metric`` are
    antspyx' defaults. Radii of 1 (3x3x3 patches and search) fuse one LPBA40 brain at 1 mm in
    16 s with 2 atlases and 45 s with 5 on one core; ANTs' defaults (patch 2, search 3) took
    ~30 times as long in one trial. Without the search (radius 0) JLF fell below majority
    vote on LPBA40 (S31, 5 atlases: 76.9 vs 77.3 % mean Dice; 79.4 % with search radius 1).

    ``restrict_to_disagreement``: fuse only where the result can differ from the label all
    atlases share around a voxel (:func:`fusion_region`), which gives the same labels as
    fusing everywhere, a few times faster. False fuses the whole image (for checking that).
    """
    patch_radius: int = 1
    search_radius: int = 1
    beta: float = 4.0
    rho: float = 0.01
    metric: str = "MSQ"
    nonnegative: bool = False
    restrict_to_disagreement: bool = True

    def __post_init__(self):
        for name in ("patch_radius", "search_radius"):
            value = getattr(self, name)
            if int(value) != value or value < 0:
                raise ValueError(f"JLF {name} must be an integer >= 0, not {value!r}")
        if self.patch_radius < 1:
            raise ValueError("JLF patch_radius must be at least 1 (a patch of one voxel has "
                             "no variance to normalise)")
        if self.metric not in JLF_METRICS:
            raise ValueError(f"unknown JLF metric {self.metric!r}; valid: {', '.join(JLF_METRICS)}")
        if self.beta <= 0 or self.rho < 0:
            raise ValueError(f"JLF needs beta > 0 and rho >= 0; got beta={self.beta}, "
                             f"rho={self.rho}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _dilate_cube(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by ``radius`` voxels in the chessboard metric, the shape of ANTs' patch
    and search neighbourhoods (a separable maximum filter)."""
    if radius <= 0:
        return mask.copy()
    from scipy.ndimage import maximum_filter
    return maximum_filter(mask.view(np.uint8), size=2 * radius + 1, mode="constant",
                          cval=0).astype(bool)


def fusion_region(label_maps: Sequence[np.ndarray], settings: JointFusionSettings
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """``(fused, mask)``: where JLF has to run and the voxels it must see.

    JLF's label at voxel ``v`` is a weighted vote of atlas labels, each read at ``v`` plus the
    search offset (within ``s = search_radius``) that best matched the target there, the
    weights coming from patch centres within ``p = patch_radius`` of ``v``. Where every atlas
    carries one and the same label ``L`` in the whole cube of radius ``s`` around ``v``, every
    vote is for ``L``, whatever the weights and offsets. So the result can differ from the
    atlases' common label only where they disagree or where some atlas' labels change within
    ``s`` (``fused``); there the weights need the patch centres within ``p`` and the label set
    needs the labels read within ``s`` (``mask``: ``fused`` grown by ``max(s, p)``).
    """
    maps = [np.asarray(m) for m in label_maps]
    stack = np.stack(maps)
    fused = (stack != stack[0]).any(axis=0)
    s, p = int(settings.search_radius), int(settings.patch_radius)
    if s > 0:
        from scipy.ndimage import maximum_filter, minimum_filter
        for labels in maps:
            fused |= (maximum_filter(labels, size=2 * s + 1, mode="nearest")
                      != minimum_filter(labels, size=2 * s + 1, mode="nearest"))
    return fused, _dilate_cube(fused, max(s, p))


def _box(mask: np.ndarray, margin: int, shape) -> Tuple[slice, ...]:
    """The bounding box of ``mask`` widened by ``margin`` voxels, clipped to ``shape``."""
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        slices.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + margin + 1,
                                                               shape[axis])))
    return tuple(slices)


def _ants_jlf(target, images, labels, mask, affine, settings: JointFusionSettings) -> np.ndarray:
    """``antsJointFusion`` on arrays of one grid: the label fusion image only.

    antspyx' ``ants.joint_label_fusion`` runs this same library entry point but asks it for one
    posterior image per label as ``.nii.gz`` files (never deleted from the temporary folder),
    which ANTs writes for every label except 0; the wrapper then takes the arg-max over those
    files, so inside the mask it can never return background. ANTs' own label fusion image
    (read here, no files) votes over every label, 0 included.
    """
    from ltnet_keras.data.align import _to_ants, load_ants
    from ltnet_keras.data.io import Volume
    load_ants()
    from ants.internal import get_lib_fn, get_pointer_string, process_arguments

    def image(array):
        return _to_ants(Volume(np.asarray(array, np.float32), affine, None, ""))

    fused = image(np.zeros(target.shape)).clone("unsigned int")
    intensity = image(np.zeros(target.shape))
    radius = "x".join([str(int(settings.patch_radius))] * 3)
    args = {"d": 3, "t": image(target), "a": settings.rho, "b": settings.beta,
            "c": int(settings.nonnegative), "p": radius, "m": settings.metric,
            "s": int(settings.search_radius), "x": image(mask).clone("unsigned int"),
            "o": f"[{get_pointer_string(fused)},{get_pointer_string(intensity)}]", "v": 0}
    # Repeated options (-g, -l): antspyx' MULTINAME convention, as in ants.joint_label_fusion.
    count = len(args)
    for atlas_image, atlas_labels in zip(images, labels):
        count += 1
        args[f"g-MULTINAME-{count}"] = image(atlas_image)
        count += 1
        args[f"l-MULTINAME-{count}"] = image(atlas_labels).clone("unsigned int")
    status = get_lib_fn("antsJointFusion")(process_arguments(args))
    if status != 0:
        raise RuntimeError(f"antsJointFusion failed (return code {status})")
    # ANTs leaves the voxels outside the mask unwritten (whatever the memory held).
    return np.where(mask, fused.numpy(), 0).astype(np.int32)


def joint_label_fusion(target_image, atlas_images: Sequence[np.ndarray],
                       atlas_labels: Sequence[np.ndarray], affine=None,
                       settings: Optional[JointFusionSettings] = None) -> np.ndarray:
    """Joint label fusion (Wang, Suh, Das, Pluta, Craige, Yushkevich: Multi-atlas segmentation
    with joint label fusion, IEEE TPAMI 35(3), 2013) of atlases warped onto the target's grid.

    ``target_image`` and each of ``atlas_images`` (intensities on a common scale, e.g. each
    normalised to [0, 1]) and ``atlas_labels`` (non-negative integer label maps) share one
    ``(x, y, z)`` shape; ``affine`` (voxel to world, default 1 mm voxels) sets the voxel size,
    by which ANTs orders the search offsets. At each voxel the atlases' votes are weighted to
    minimise their expected joint error, estimated from patch differences to the target
    (Eq. 7-9 of the paper), so atlases that err in the same way do not out-vote a better one.
    Returns an int32 label map. One atlas is returned as it is.
    """
    settings = settings or JointFusionSettings()
    labels = _check_maps(atlas_labels, "atlas label maps")
    images = _check_maps(atlas_images, "atlas images")
    target = np.asarray(target_image, dtype=np.float32)
    if len(images) != len(labels):
        raise ValueError(f"JLF needs one image per label map; got {len(images)} images and "
                         f"{len(labels)} label maps")
    if images[0].shape != target.shape or labels[0].shape != target.shape:
        raise ValueError(f"atlas images {images[0].shape} and label maps {labels[0].shape} must "
                         f"be on the target's grid {target.shape}")
    if any(np.issubdtype(m.dtype, np.floating) or (m.size and m.min() < 0) for m in labels):
        raise ValueError("atlas label maps must hold non-negative integer label ids")
    labels = [m.astype(np.int32, copy=False) for m in labels]
    if len(labels) == 1:
        return labels[0].copy()
    affine = np.eye(4) if affine is None else np.asarray(affine, np.float64)
    if not settings.restrict_to_disagreement:
        return _ants_jlf(target, images, labels, np.ones(target.shape, bool), affine, settings)

    fused_region, mask = fusion_region(labels, settings)
    result = labels[0].copy()
    if not fused_region.any():
        return result
    # Everything JLF reads for the mask lies within patch + search radius of it.
    box = _box(mask, int(settings.patch_radius) + int(settings.search_radius), target.shape)
    origin = np.eye(4)
    origin[:3, 3] = [b.start for b in box]
    fused = _ants_jlf(target[box], [i[box] for i in images], [m[box] for m in labels], mask[box],
                      affine @ origin, settings)
    region = fused_region[box]
    result[box][region] = fused[region]
    return result


#: How :func:`fuse_atlases` combines several atlases' label maps.
FUSIONS = ("majority", "jlf")


def similarity_order(warped_images: Sequence[np.ndarray], target: np.ndarray) -> List[int]:
    """Indices of ``warped_images`` by decreasing Pearson correlation with ``target`` (stable:
    equal ones keep their order). Majority vote gives ties to the earliest map, i.e. to the
    atlas that after registration looks most like the target."""
    from ltnet_keras.data.atlas import _ncc
    target = np.asarray(target, np.float64)
    similarity = [_ncc(np.asarray(image, np.float64), target) for image in warped_images]
    similarity = [-np.inf if np.isnan(s) else s for s in similarity]
    return sorted(range(len(similarity)), key=lambda i: -similarity[i])


def fuse_atlases(label_maps: Sequence[np.ndarray], warped_images: Sequence[np.ndarray],
                 target_image: np.ndarray, method: str = "majority", affine=None,
                 settings: Optional[JointFusionSettings] = None) -> np.ndarray:
    """One label map from k atlases registered to a target, all on the target's grid.

    The atlases are first ordered by how much their warped image looks like the target
    (:func:`similarity_order`); ``method`` ``"majority"``: :func:`majority_vote` (ties to the
    most similar atlas), ``"jlf"``: :func:`joint_label_fusion` (``target_image`` and
    ``warped_images`` on one intensity scale). One atlas' map is returned as it is.
    """
    if method not in FUSIONS:
        raise ValueError(f"unknown fusion {method!r}; valid: {', '.join(FUSIONS)}")
    if len(label_maps) != len(warped_images):
        raise ValueError(f"one warped image per label map needed; got {len(warped_images)} "
                         f"images and {len(label_maps)} label maps")
    order = similarity_order(warped_images, target_image)
    maps = [label_maps[i] for i in order]
    if len(maps) == 1:
        return np.asarray(maps[0]).copy()
    if method == "jlf":
        return joint_label_fusion(target_image, [warped_images[i] for i in order], maps, affine,
                                  settings)
    return majority_vote(maps)
