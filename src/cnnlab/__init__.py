"""cnnlab: the landmark convolutional networks, built from shared blocks.

    >>> import cnnlab
    >>> model = cnnlab.create_model("resnet50", num_classes=10)
"""
from cnnlab._errors import CnnlabError
from cnnlab.analysis import summary
from cnnlab.models import create_model, list_models, load_weights, model_info

__version__ = "0.2.0"
__all__ = ["CnnlabError", "create_model", "list_models", "load_weights", "model_info", "summary", "__version__"]
