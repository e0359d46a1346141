"""Hugging Face ``datasets`` as Records: a save_to_disk folder or an in-memory Dataset (images kept encoded)."""

from __future__ import annotations

from typing import Any, Iterator

from mmlm.errors import DataError

from .records import Record


def _hf_records(dataset: Any, name: str, label_field: str) -> Iterator[Record | DataError]:
    import datasets as hf

    if isinstance(dataset, hf.DatasetDict):
        raise DataError(f"{name}: a DatasetDict with splits {list(dataset)}; point the source at one split "
                        f"(e.g. {name}/{next(iter(dataset), 'train')})")
    features = dataset.features
    image_cols = [c for c, f in features.items() if isinstance(f, hf.Image)] or \
        [c for c in ("image", "img", "image_path", "file_name") if c in features]
    if not image_cols:
        raise DataError(f"{name}: no image column (an Image feature or a column named image/img); "
                        f"columns are {list(features)}")
    text_cols = [c for c in ("caption", "captions", "text", "sentences") if c in features]
    image_col = image_cols[0]
    if isinstance(features[image_col], hf.Image) and features[image_col].decode:
        # Keep the encoded bytes: lighter than decoded images, and decoded later by our safe decoder.
        dataset = dataset.cast_column(image_col, hf.Image(decode=False))
    label_feature = features.get(label_field)
    for i, row in enumerate(dataset):
        where = f"{name}[{i}]"
        value = row[image_col]
        if isinstance(value, dict):  # Image(decode=False): {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if value is None:
            yield DataError(f"{where}: column '{image_col}' is empty")
            continue
        captions = []
        for col in text_cols:
            cell = row[col]
            if isinstance(cell, str):
                captions.append(cell)
            elif isinstance(cell, list) and all(isinstance(c, str) for c in cell):
                captions.extend(cell)
            elif cell is not None:
                yield DataError(f"{where}: column '{col}' must be a string or list of strings, got {cell!r:.60}")
                break
        else:
            label = row.get(label_field)
            if isinstance(label_feature, hf.ClassLabel) and label is not None:
                label = label_feature.int2str(label)
            attributes = {k: v for k, v in row.items() if k not in (image_col, label_field, *text_cols)}
            yield Record(image=value, captions=captions, label=None if label is None else str(label),
                         attributes=attributes, source=where)
