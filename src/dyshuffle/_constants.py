"""Constants shared by the models (``pretrained_cfg``) and the data code (normalization)."""

#: ImageNet's channel means and standard deviations (torchvision's and timm's values)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
