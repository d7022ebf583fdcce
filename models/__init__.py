"""GLNet model: `from models import GLNet`."""
from models.glnet import GLNet, Maps

__all__ = ["GLNet", "Maps"]
