"""Images per second through the data layer: the shapes generator, and DataLoaders over shapes and PNG manifests.

    python benchmarks/data_throughput.py [--n 2000] [--workers 0 2] [--batch-size 64]

Every loader applies the same 64x64 ToTensor + Normalize transform. Run it alone on the machine:
timings collapse when another process shares the cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from mmlm.data import ImageTextDataset, ShapesRecords, collate_image_text, generate_shapes, read_records, write_dataset


def transform_64():
    return v2.Compose([v2.ToImage(), v2.Resize((64, 64), antialias=True), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize([0.5] * 3, [0.5] * 3)])


def images_per_second(run, n: int) -> float:
    start = time.perf_counter()
    run()
    return n / (time.perf_counter() - start)


def loader_rate(dataset, workers: int, batch_size: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_image_text)

    def drain():
        for batch in loader:
            assert batch["pixel_values"].shape[1:] == (3, 64, 64)

    return images_per_second(drain, len(dataset))  # includes worker start-up, as a real epoch does


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [("shapes generator (generate_shapes)", "-", images_per_second(lambda: generate_shapes(args.n), args.n))]
    in_memory = generate_shapes(args.n)
    for workers in args.workers:
        rows.append(("shapes, generated lazily per item", workers,
                     loader_rate(ImageTextDataset(ShapesRecords(args.n), transform_64()), workers, args.batch_size)))
        rows.append(("shapes, pre-generated in memory", workers,
                     loader_rate(ImageTextDataset(in_memory, transform_64()), workers, args.batch_size)))
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_dataset(in_memory, tmp)
        records = read_records(manifest)
        for workers in args.workers:
            rows.append(("JSONL manifest of 64x64 PNGs", workers,
                         loader_rate(ImageTextDataset(records, transform_64()), workers, args.batch_size)))
    print(f"{'pipeline':<38} {'workers':>7} {'images/s':>10}")
    for name, workers, rate in rows:
        print(f"{name:<38} {workers!s:>7} {rate:>10.0f}")


if __name__ == "__main__":
    main()
