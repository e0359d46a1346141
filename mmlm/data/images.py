"""Safe image decoding for the data layer: the names of ``mmlm.images``, which models and data share."""

from mmlm.images import DEFAULT_MAX_PIXELS, BadImageError, ImageInfo, image_info, load_image

__all__ = ["DEFAULT_MAX_PIXELS", "BadImageError", "ImageInfo", "image_info", "load_image"]
