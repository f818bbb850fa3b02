"""Write the toy world (common.ToyWorld) as files: `OUT/<split>/NNNNNN.png` and `OUT/instances_<split>.json`
(COCO format, masks as uncompressed RLE), e.g. a COCO-format folder for `--coco` or an image folder for
`--data`:

    python -m tools.toy_world OUT N [--split val] [--image-size 256] [--saliency DIR]
"""
import argparse
import json
import os

import numpy as np

from common import TOY_CATEGORIES, ToyWorld


def _uncompressed_rle(mask):
    """COCO's uncompressed RLE (column-major run lengths, starting with zeros)."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], changes, [len(flat)]])
    counts = np.diff(edges).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": counts, "size": list(mask.shape)}


def write_toy_world(out_dir, num_images, split="train", image_size=256, seed=0, saliency_dir=None):
    """Write the toy world as `out_dir/<split>/NNNNNN.png` + `out_dir/instances_<split>.json`.

    Masks are stored as uncompressed RLE. With `saliency_dir`, also writes each image's
    ground-truth foreground mask as `saliency_dir/NNNNNN.png` (the `--saliency DIR` layout).
    """
    world = ToyWorld(num_images, image_size, split, seed)
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    if saliency_dir:
        os.makedirs(saliency_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image, target = world[index]
        name = f"{index:06d}.png"
        image.save(os.path.join(out_dir, split, name))
        if saliency_dir:
            target["mask"].save(os.path.join(saliency_dir, name))
        images.append({"id": index + 1, "file_name": name, "width": image.width, "height": image.height})
        for box, label, mask in zip(target["boxes"].tolist(), target["labels"].tolist(), target["masks"]):
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": label,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": int(mask.sum()),
                                "iscrowd": 0, "segmentation": _uncompressed_rle(mask.numpy())})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(TOY_CATEGORIES)]
    with open(os.path.join(out_dir, f"instances_{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return out_dir




if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tools.toy_world", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out_dir", metavar="OUT", help="folder to write")
    parser.add_argument("num_images", metavar="N", type=int, help="images")
    parser.add_argument("--split", default="train", choices=("train", "val"), help="the toy world's split")
    parser.add_argument("--image-size", type=int, default=256, help="the toy world's image side")
    parser.add_argument("--seed", type=int, default=0, help="the toy world's seed")
    parser.add_argument("--saliency", default=None, metavar="DIR",
                        help="also write the ground-truth foreground masks here (the --saliency DIR layout)")
    args = parser.parse_args()
    write_toy_world(args.out_dir, args.num_images, args.split, args.image_size, args.seed, args.saliency)
    print(f"wrote {args.num_images} {args.split} images and instances_{args.split}.json in {args.out_dir}")
