"""ImageNet's per-channel pixel statistics, the normalisation every paper of this project uses by default
(written here once: data transforms, SimMIM's colour targets, exports' data configs)."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
