"""SE model zoo: ``create_model(name)``, ``list_models()``, complexity tools (arXiv:1709.01507)."""

from models.registry import create_model, list_models, model_options, register_model
from models import inception as _inception  # noqa: F401  (registers bn_inception, se_bn_inception)
from models import senet as _senet  # noqa: F401  (registers the bottleneck family)
from models.se import SqueezeExcitation

__all__ = ["SqueezeExcitation", "create_model", "list_models", "model_options", "register_model"]
