"""Caption every image in a folder to JSONL, in batches with a progress bar.

    python examples/caption_folder.py runs/demo/captioner photos/ captions.jsonl
"""

import argparse
import json
from pathlib import Path

import mmlm

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("folder")
    parser.add_argument("out")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    captioner = mmlm.load(args.model)
    paths = sorted(p for p in Path(args.folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    captions = captioner.caption([str(p) for p in paths], batch_size=args.batch_size, progress=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for path, caption in zip(paths, captions):
            f.write(json.dumps({"image": str(path), "caption": caption}, ensure_ascii=False) + "\n")
    print(f"{len(paths)} captions -> {args.out}")


if __name__ == "__main__":
    main()
