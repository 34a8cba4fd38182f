"""kdlab's model zoo: build any network by name with `create_model`.

Importing this package registers the built-in models: the PyTorch KD tutorial's DeepNN/LightNN
and the CRD benchmark's CIFAR models (ResNets, WRNs, VGGs, MobileNetV2, ShuffleNetV1/V2,
ResNet50); torchvision models are reachable as `torchvision/<name>`.
"""

# Imported so that their models register.
from kdlab.models import (  # noqa: F401
    cifar_resnet,
    mobilenetv2,
    resnet_bottleneck,
    shufflenet,
    tutorial,
    vgg,
    wrn,
)
from kdlab.models.checkpoint import load_weights
from kdlab.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "load_weights", "register_model"]
