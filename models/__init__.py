"""GLNet model: `from models import GLNet`."""
from models.glnet import GLNet, LocalOnly, Maps

__all__ = ["GLNet", "LocalOnly", "Maps"]
