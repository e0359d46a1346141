"""Data layer: sources -> Records -> safe decoding -> torch Datasets; plus the embedded shapes and digits data."""

from .sources import DataError, Record, detect_format, iter_records, read_records, scan_records  # noqa: I001
from .images import BadImageError, ImageInfo, image_info, load_image
from .shapes import (
    COLOURS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPE_KINDS,
    SIZES,
    ShapesRecords,
    canonical_caption,
    captions_match,
    generate_shapes,
    parse_caption,
    write_dataset,
)
from .digits import DIGIT_WORDS, digits_records, digits_split_indices
from .datasets import (
    DataWorkerError,
    ImageTextDataset,
    StreamingImageTextDataset,
    build_datasets,
    collate_image_text,
    explain_worker_failure,
    guard_workers,
    split_records,
    summarize,
)
from .inspect import inspect_manifest, write_shapes_cli

__all__ = [
    "BadImageError", "COLOURS", "DIGIT_WORDS", "DataError", "DataWorkerError", "HELD_OUT_PAIRS", "ImageInfo",
    "ImageTextDataset", "POSITIONS", "Record", "SHAPE_KINDS", "SIZES", "ShapesRecords", "StreamingImageTextDataset",
    "build_datasets", "canonical_caption", "captions_match", "collate_image_text", "detect_format", "digits_records",
    "digits_split_indices", "explain_worker_failure", "generate_shapes", "guard_workers", "image_info",
    "inspect_manifest", "iter_records", "load_image", "parse_caption", "read_records", "scan_records", "split_records",
    "summarize", "write_dataset", "write_shapes_cli",
]
