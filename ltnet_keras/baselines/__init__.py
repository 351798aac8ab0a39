"""The paper's comparisons, not the method: ANTs SyN multi-atlas segmentation
(``multi_atlas``), DataAug (``dataaug``) and the supervised segmentation U-Net (``segnet``),
which share the U-Net and its training loop in ``unet``."""
