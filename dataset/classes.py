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


def _colour_code(rgb) -> int:
    """3-bit code of a thresholded colour: red*4 + green*2 + blue (each bit = channel >= 128)."""
    r, g, b = (int(c) >= 128 for c in rgb)
    return r * 4 + g * 2 + b


# code -> class index for the 8 colours a thresholded mask can contain. The one code that is
# not a DeepGlobe colour, (255, 0, 0) red, maps to 0 'unknown' and is flagged as off-palette.
_CODE_TO_CLASS = np.zeros(8, dtype=np.uint8)
_CODE_OFF_PALETTE = np.ones(8, dtype=bool)
for _index, _colour in enumerate(CLASS_COLORS):
    _CODE_TO_CLASS[_colour_code(_colour)] = _index
    _CODE_OFF_PALETTE[_colour_code(_colour)] = False
del _index, _colour


def rgb_mask_to_class(mask_rgb: np.ndarray) -> tuple:
    """DeepGlobe RGB mask (H, W, 3) -> (class indices (H, W) uint8, off-palette pixel count).

    Each channel is thresholded at 128 (>= 128 -> 255, else 0, GLNET_SPEC.md section 7) and the
    resulting colour is looked up in CLASS_COLORS. A thresholded colour that is no class colour
    (only red is possible) becomes 0 'unknown' and is counted in the second return value.
    Extra channels (alpha) are ignored.
    """
    mask = np.asarray(mask_rgb)
    if mask.ndim != 3 or mask.shape[2] < 3:
        raise ValueError(f"expected an RGB mask of shape (H, W, 3), got {mask.shape}")
    rgb = mask[..., :3]
    if rgb.dtype == np.uint8:
        bits = rgb >> 7  # 1 where the channel is >= 128
    else:
        bits = (rgb >= 128).astype(np.uint8)
    code = (bits[..., 0] << 2) | (bits[..., 1] << 1) | bits[..., 2]
    classes = _CODE_TO_CLASS[code]
    off_palette = sum(int(np.count_nonzero(code == c)) for c in np.flatnonzero(_CODE_OFF_PALETTE))
    return classes, off_palette
