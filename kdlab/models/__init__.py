"""kdlab's model zoo: build any network by name with `create_model`.

Importing this package registers the built-in models (the PyTorch KD tutorial's DeepNN/LightNN
and the CRD benchmark's CIFAR ResNets); torchvision models are reachable as `torchvision/<name>`.
"""

from kdlab.models import cifar_resnet, tutorial  # noqa: F401  (imported so the models register)
from kdlab.models.checkpoint import load_weights
from kdlab.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "load_weights", "register_model"]
