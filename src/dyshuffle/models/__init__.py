"""Model zoo: ShuffleNetV1/V2 with pluggable channel mixers, and MobileNetV2 with SDS pointwise.

>>> from dyshuffle.models import create_model, list_models
>>> model = create_model("shufflenet_v2_x0_5", num_classes=10, stem="cifar", mixer="dynamic")

Every model has ``forward_features``, ``forward_head(x, pre_logits=False)``,
``reset_classifier(num_classes)``, ``num_features`` and ``model_args`` (the keywords that rebuild
it with :func:`create_model`), and, for detection and segmentation necks, timm's
``feature_info``, ``forward_intermediates`` and ``prune_intermediate_layers``;
``create_model(name, features_only=True, out_indices=...)`` returns a :class:`FeatureListNet`.
Also timm's ``set_grad_checkpointing`` (exact: the same training step) and ``pretrained_cfg``
(what ``timm.data.resolve_data_config`` reads); ``hubconf.py`` serves them through ``torch.hub``.
"""

from ._blocks import ClassifierModel
from ._features import FeatureInfo, FeatureListNet, feature_take_indices
from ._registry import (
    MIXER_DESCRIPTORS,
    POINTWISE,
    STEMS,
    create_model,
    is_model,
    list_models,
    model_entrypoint,
    register_model,
)
from .mobilenet_v2 import MobileInvertedResidual, MobileNetV2
from .shufflenet_v1 import ShuffleNetV1, ShuffleV1Unit
from .shufflenet_v2 import InvertedResidual, ShuffleNetV2

from ._timm import install_timm_hook, register_timm_models  # isort: skip (after the builders)

install_timm_hook()

__all__ = [
    "MIXER_DESCRIPTORS",
    "POINTWISE",
    "STEMS",
    "ClassifierModel",
    "FeatureInfo",
    "FeatureListNet",
    "InvertedResidual",
    "MobileInvertedResidual",
    "MobileNetV2",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "ShuffleV1Unit",
    "create_model",
    "feature_take_indices",
    "is_model",
    "list_models",
    "model_entrypoint",
    "register_model",
    "register_timm_models",
]
