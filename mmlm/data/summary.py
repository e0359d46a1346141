"""``summarize``: counts, caption lengths, image sizes and modes, labels and bad images of a set of Records."""

from __future__ import annotations

import collections
import statistics
from typing import Sequence

from .images import DEFAULT_MAX_PIXELS, BadImageError, image_info
from .records import Record
from .samples import bad_image_source


def summarize(records: Sequence[Record], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Counts, caption lengths (words; characters for CJK), image size / mode histograms, labels, bad images."""
    sizes, modes, labels = collections.Counter(), collections.Counter(), collections.Counter()
    lengths, per_record, bad = [], [], []
    for record in records:
        per_record.append(len(record.captions))
        lengths.extend(len(c.split()) if c.isascii() else len(c) for c in record.captions)
        if record.label is not None:
            labels[record.label] += 1
        try:
            info = image_info(record.image, max_pixels=max_pixels)
        except BadImageError as err:
            bad.append((bad_image_source(record, err), err.reason))
            continue
        sizes[f"{info.width}x{info.height}"] += 1
        modes[info.mode] += 1

    def stats(values):
        if not values:
            return {"min": 0, "max": 0, "mean": 0.0, "median": 0.0}
        return {"min": min(values), "max": max(values), "mean": round(statistics.fmean(values), 2),
                "median": statistics.median(values)}

    return {"records": len(per_record), "captions": sum(per_record), "captions_per_record": stats(per_record),
            "caption_length": stats(lengths), "labels": dict(labels.most_common()),
            "image_sizes": dict(sizes.most_common()), "image_modes": dict(modes.most_common()), "bad_images": bad}
