"""DeepGlobe land-cover classes and their colours (GLNET_SPEC.md section 7)."""
import numpy as np

CLASS_NAMES = ("unknown", "urban", "agriculture", "rangeland", "forest", "water", "barren")

# RGB colour of each class index, as in the DeepGlobe masks.
CLASS_COLORS = np.array(
    [
        (0, 0, 0),
        (0, 255, 255),
        (255, 255, 0),
        (255, 0, 255),
        (0, 255, 0),
        (0, 0, 255),
        (255, 255, 255),
    ],
    dtype=np.uint8,
)


def colorize(mask: np.ndarray) -> np.ndarray:
    """Class-index mask (H, W) -> DeepGlobe colour image (H, W, 3) uint8.

    Indices outside the palette (e.g. 255 = ignore) are drawn black.
    """
    mask = np.asarray(mask)
    out = np.zeros(mask.shape + (3,), dtype=np.uint8)
    valid = mask < len(CLASS_COLORS)
    out[valid] = CLASS_COLORS[mask[valid]]
    return out
