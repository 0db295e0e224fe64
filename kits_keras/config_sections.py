"""The sections of :class:`kits_keras.config.ExperimentConfig`: frozen
dataclasses for data, augmentation, model, loss, training, inference and
post-processing, and the names their fields take values from.

Import them from :mod:`kits_keras.config`, which groups them into the one
experiment config (this module only keeps that file short).

Axis order everywhere is ``(z, y, x)``; spacings are in mm.
"""

import dataclasses

# TFDS builder configs: name -> target spacing (z, y, x) in mm. The name says
# what the config is, so that ``tfds.load("kits19/<name>")`` is self-describing.
DATASET_SPACINGS = {
    # The spacing of the KiTS19 "interpolated" release, used by the paper.
    "interp_3.0x0.78mm": (3.0, 0.78, 0.78),
    # Coarse: about 8x fewer voxels, for quick work on CPUs.
    "coarse_3.22x1.62mm": (3.22, 1.62, 1.62),
    # Very coarse: for the CPU demo and tests on synthetic cases.
    "demo_4.0x3.2mm": (4.0, 3.2, 3.2),
}

# Label sets: name -> the label values of its segmentations, 0 first.
# ``data.label_set`` picks the TFDS builder of the same name
# (``tfds_kits19/<name>/``) and the labels ``model.num_classes`` counts.
LABEL_SETS = {
    # KiTS19: background, kidney, tumour.
    "kits19": (0, 1, 2),
    # KiTS21/KiTS23: background, kidney, tumour, cyst.
    "kits23": (0, 1, 2, 3),
}

# ``model.output_mode``: one softmax over the labels, or one sigmoid per
# nested region (KiTS19: kidney, tumour; KiTS23: its three HECs),
# :mod:`kits_keras.model.regions`.
OUTPUT_MODES = ("softmax", "regions")

# ``train.lr_schedule``: the paper's reduce-on-plateau, or nnU-Net's
# polynomial decay to zero.
LR_SCHEDULES = ("plateau", "poly")

# ``train.optimizer``: the paper's Adam, or nnU-Net's SGD with Nesterov
# momentum.
OPTIMIZERS = ("adam", "sgd")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Dataset and patch sampling.

    Attributes:
        dataset: TFDS builder config name (a key of ``DATASET_SPACINGS``).
        label_set: a key of ``LABEL_SETS``: "kits19" (labels 0-2) or
            "kits23" (0-3, cyst added); also the TFDS builder's name
            (``kits19/<dataset>`` or ``kits23/<dataset>``).
        patch_size: patch shape ``(z, y, x)`` in voxels.
        foreground_fraction: share of patches centred on a foreground voxel
            (nnU-Net: 1/3).
        tumour_fraction: share of those foreground patches centred on a
            mass voxel (tumour; for "kits23" tumour or cyst), when the
            volume has one.
        patches_per_volume: patches cut from each loaded volume.
        shuffle_volumes: volumes held in the shuffle buffer.
        validation_cases: training cases held out for validation.
        foreground_samples: voxel coordinates of each foreground class
            (kidney-or-tumour, tumour) that ``kits-keras prepare`` stores
            per case for oversampling. Part of the dataset: ``prepare``
            records it (a dataset built with another value is out of date)
            and training refuses a dataset built with another value.
    """

    dataset: str = "interp_3.0x0.78mm"
    label_set: str = "kits19"
    patch_size: tuple = (48, 192, 192)
    foreground_fraction: float = 1.0 / 3.0
    tumour_fraction: float = 0.5
    patches_per_volume: int = 4
    shuffle_volumes: int = 8
    validation_cases: int = 10
    foreground_samples: int = 10000

    def __post_init__(self):
        if self.label_set not in LABEL_SETS:
            raise ValueError(
                f"Unknown label_set. Expected one of {tuple(LABEL_SETS)}. "
                f"Received: label_set={self.label_set!r}")

    @property
    def target_spacing(self):
        return DATASET_SPACINGS[self.dataset]


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation: a probability and a range for each transform.

    Defaults follow nnU-Net v1's 3-D set (batchgenerators): rotation, scaling
    and elastic deformation are applied in one resampling of the patch.

    Attributes:
        p_rotation: probability of rotating a patch.
        rotation_degrees: maximal absolute angle about the (z, y, x) axes.
        p_scale: probability of scaling.
        scale_range: isotropic zoom factor range.
        p_elastic: probability of elastic deformation.
        elastic_alpha: displacement magnitude range (voxels^2, as
            batchgenerators' alpha).
        elastic_sigma: smoothing range of the displacement field (voxels).
        elastic_max_displacement: hard bound on displacement in voxels.
        p_gamma: probability of gamma correction.
        gamma_range: gamma range, intensities rescaled to [0, 1] first and
            back afterwards (mean and std retained).
        p_mirror: probability of mirroring along each of (z, y, x).
        p_brightness: probability of multiplying a patch's intensities by
            one factor (nnU-Net's multiplicative brightness).
        brightness_range: range of that factor.
        p_contrast: probability of scaling intensities about the patch
            mean, clipped to the patch's former range.
        contrast_range: range of the contrast factor.
        p_noise: probability of adding Gaussian noise.
        noise_variance: range of the noise variance, in units of the
            normalised intensities (z-scores).
        p_blur: probability of a Gaussian blur.
        blur_sigma: range of its sigma, in voxels, drawn per axis.
        p_low_resolution: probability of simulating a coarser scan: the
            patch is subsampled (nearest) by one zoom factor on every axis
            and interpolated back (cubic in-plane, linear across slices).
        low_resolution_zoom: range of that zoom factor (0.5: half the
            voxels per axis).
        p_tumour_contrast: probability of moving a patch's tumour
            intensities towards its kidney's (only in patches with both).
        tumour_contrast_range: range of the fraction of the kidney-tumour
            difference of means removed (1: tumour as bright as kidney on
            average; negative: a more conspicuous tumour).

    The image is resampled trilinearly, the labels by nearest neighbour
    (cubic would need 8x the gathers).
    """

    p_rotation: float = 0.2
    rotation_degrees: tuple = (15.0, 15.0, 15.0)
    p_scale: float = 0.2
    scale_range: tuple = (0.85, 1.25)
    p_elastic: float = 0.2
    elastic_alpha: tuple = (0.0, 900.0)
    elastic_sigma: tuple = (9.0, 13.0)
    elastic_max_displacement: float = 8.0
    p_gamma: float = 0.3
    gamma_range: tuple = (0.7, 1.5)
    p_mirror: tuple = (0.5, 0.5, 0.5)
    # nnU-Net's intensity transforms: across scanners and contrast phases
    # the same organ sits at different HU, which gamma alone does not cover.
    p_brightness: float = 0.15
    brightness_range: tuple = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple = (0.75, 1.25)
    p_noise: float = 0.1
    noise_variance: tuple = (0.0, 0.1)
    # nnU-Net's resolution transforms: cases come from 0.5 to 5 mm slices
    # and sharp to soft kernels, and resampling to one spacing leaves that
    # difference in the image. nnU-Net draws them with p 0.2 and 0.25 per
    # patch, then 0.5 per channel: 0.1 and 0.125 for single-channel CT.
    p_blur: float = 0.1
    blur_sigma: tuple = (0.5, 1.0)
    p_low_resolution: float = 0.125
    low_resolution_zoom: tuple = (0.5, 1.0)
    # Not nnU-Net's: a label-aware intensity change like TumorCP's
    # object-level one (Yang et al., MICCAI 2021, on KiTS19), so that a
    # handful of training cases shows tumours of every contrast to the
    # kidney, not only the few that were drawn. Off (the paper did not use
    # it; on `tiny` it scored within the spread of two seeds, README's
    # quality finding 5).
    p_tumour_contrast: float = 0.0
    tumour_contrast_range: tuple = (-0.3, 0.8)

    @property
    def mirrored_axes(self):
        """The axes of ``(z, y, x)`` that training mirrors (``p_mirror`` >
        0), which test-time mirroring may flip too.

        >>> AugmentConfig(p_mirror=(0.0, 0.0, 0.5)).mirrored_axes
        (2,)
        """
        return tuple(a for a, p in enumerate(self.p_mirror) if p > 0)

    def disabled(self):
        """This config with every ``p_*`` probability at 0: plain crops.

        Validation patches use it; a transform added later is switched off
        too, as long as its probability is named ``p_<name>``.

        >>> off = AugmentConfig().disabled()
        >>> off.p_noise, off.p_mirror, off.noise_variance
        (0.0, (0.0, 0.0, 0.0), (0.0, 0.1))
        """
        zero = {}
        for field in dataclasses.fields(self):
            if field.name.startswith("p_"):
                value = getattr(self, field.name)
                zero[field.name] = (tuple(0.0 for _ in value)
                                    if isinstance(value, tuple) else 0.0)
        return dataclasses.replace(self, **zero)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """3-D U-Net architecture.

    Attributes:
        num_levels: resolution levels, including the bottleneck.
        base_filters: features at full resolution; doubled per level.
        max_filters: cap on features per level (nnU-Net: 320).
        num_classes: label classes, background included: 3 for KiTS19
            (background, kidney, tumour), 4 for KiTS23 (and cyst).
            Training refuses a dataset with another number of labels
            (``metadata["label_values"]``).
        output_mode: "softmax" (one probability per class, exp-log loss)
            or "regions" (one sigmoid per nested region, Dice + BCE per
            region, as the top KiTS21/KiTS23 entries;
            :mod:`kits_keras.model.regions`). Either way ``infer`` writes
            labels.
        norm: "instance" or "batch".
        negative_slope: leaky ReLU slope.
        strides: per-level downsampling strides ``(z, y, x)``; the first is
            (1, 1, 1). Empty means derive from patch size and spacing.
    """

    num_levels: int = 5
    base_filters: int = 30
    max_filters: int = 320
    num_classes: int = 3
    output_mode: str = "softmax"
    norm: str = "instance"
    negative_slope: float = 0.01
    strides: tuple = ()

    def __post_init__(self):
        if self.output_mode not in OUTPUT_MODES:
            raise ValueError(
                f"Unknown output_mode. Expected one of {OUTPUT_MODES}. "
                f"Received: output_mode={self.output_mode!r}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Exponential-logarithmic loss (Wong et al., MICCAI 2018), or with
    ``model.output_mode="regions"`` Dice + binary cross-entropy per region
    (weights ``w_dice``, ``w_ce`` and ``smooth`` apply to both).

    Attributes:
        w_dice: weight of the Dice term.
        w_ce: weight of the cross-entropy term.
        gamma_dice: exponent of ``-ln Dice``.
        gamma_ce: exponent of ``-ln p``.
        class_weights: cross-entropy weight per class (background, kidney,
            tumour[, cyst]); one per ``model.num_classes``. Softmax only.
        smooth: Dice smoothing added to numerator and denominator.
    """

    w_dice: float = 0.8
    w_ce: float = 0.2
    gamma_dice: float = 0.3
    gamma_ce: float = 0.3
    class_weights: tuple = (1.0, 1.0, 2.0)
    smooth: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation schedule.

    Attributes:
        optimizer: "adam" (the paper) or "sgd" (nnU-Net: Nesterov
            momentum ``momentum``).
        learning_rate: the optimizer's initial learning rate.
        momentum: SGD's momentum (nnU-Net: 0.99); unused by Adam.
        weight_decay: decoupled weight decay per step, as a share of the
            learning rate times the weight (Keras' ``weight_decay``;
            nnU-Net: 3e-5); 0: none.
        clip_norm: 0 (the paper) or the bound on the global norm of the
            gradient of each step (nnU-Net: 12).
        lr_schedule: "plateau" (the paper: x ``lr_factor`` when the
            training loss has not improved for ``lr_patience`` epochs) or
            "poly" (nnU-Net: ``learning_rate * (1 - epoch / epochs) ** 0.9``
            at the start of each epoch, reaching ~0 at the end).
        lr_factor: multiplier when the training loss stalls ("plateau").
        lr_patience: epochs without improvement before the reduction
            ("plateau").
        epochs: epochs to train.
        steps_per_epoch: iterations per epoch.
        batch_size: global batch, split across devices.
        validation_every: epochs between validation passes (patches).
        volume_validation_every: epochs between full-volume (sliding
            window) validations of the validation cases, which choose the
            best checkpoint; also run on the first and last epoch. 0 picks
            it by the patch Dice instead.
        metric_smoothing: moving-average window (epochs) of the validation
            metric used to choose the best checkpoint.
        seed: seed for weights, sampling and augmentation.
        ema_momentum: 0 (the paper) or the momentum in [0, 1) of an
            exponential moving average of the weights, updated every step
            (0.995: a mean over the last ~200 steps); validation and the
            saved model then use the average, training continues from the
            raw weights (:mod:`kits_keras.training.averaging`).
    """

    optimizer: str = "adam"
    learning_rate: float = 3e-4
    momentum: float = 0.99
    weight_decay: float = 0.0
    clip_norm: float = 0.0
    lr_schedule: str = "plateau"
    lr_factor: float = 0.2
    lr_patience: int = 30
    epochs: int = 700
    steps_per_epoch: int = 250
    batch_size: int = 8
    validation_every: int = 1
    volume_validation_every: int = 5
    metric_smoothing: int = 10
    seed: int = 0
    ema_momentum: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(
                "ema_momentum must be in [0, 1) (0: no averaging). "
                f"Received: ema_momentum={self.ema_momentum!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"Unknown optimizer. Expected one of {OPTIMIZERS}. "
                f"Received: optimizer={self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"Unknown lr_schedule. Expected one of {LR_SCHEDULES}. "
                f"Received: lr_schedule={self.lr_schedule!r}")


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """Sliding-window prediction.

    Attributes:
        overlap: overlap between neighbouring tiles, as a share of the patch.
        tta: "all" (8 mirrorings), "flip" (in-plane flips, 4) or "none";
            only along ``augment.mirrored_axes``.
        batch_size: tiles per network call.
        gaussian_sigma_scale: sigma of the importance map / patch size.
        qc_threshold: mirroring-disagreement share above which a case is
            flagged for review.
    """

    overlap: float = 0.5
    tta: str = "all"
    batch_size: int = 2
    gaussian_sigma_scale: float = 0.125
    qc_threshold: float = 0.1


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
    """Connected-component clean-up (:func:`kits_keras.inference.postprocess.
    postprocess`, whose docstring gives the rules).

    Attributes:
        max_components: kidney-plus-tumour components kept at most.
        min_fraction: smallest kept component, as a share of the largest.
        min_fraction_tumour_only: smallest kept component without kidney
            voxels, as a share of the largest kidney-bearing one.
        min_ml_tumour_only: smallest kept component without kidney voxels
            when no component bears kidney (mL; needs the voxel size).
    """

    max_components: int = 2
    min_fraction: float = 0.05
    min_fraction_tumour_only: float = 0.3
    min_ml_tumour_only: float = 100.0
