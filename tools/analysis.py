"""What the analysis tools share: backbones from any weights file, held-out images with boxes
(the toy world's val split or a COCO-format folder), progress lines, the line chart, the command line."""
import argparse
import json
import os
import time

import torch
import torchvision
import torchvision.transforms as T
from PIL import Image, ImageDraw

from common import IMAGENET_MEAN, IMAGENET_STD, TOY_CATEGORIES, ResNetTrunk, ToyWorld, read_weights, to_rgb

NORMALISE = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
COLOURS = ("red", "blue", "green", "orange", "purple", "brown", "magenta", "teal", "black", "olive", "navy", "gray")


def get_args(description, argv, tiny, output_dir, add_flags=None):
    """The tools' shared command line, `BACKBONE [BACKBONE ...] [--tiny] [--output-dir DIR] [--coco JSON DIR]
    [--analysis-images N] [--image-size S] [--seed N]`, plus the tool's own flags (`add_flags(parser)`).
    --tiny sets `tiny` (the values of the --tiny runs whose backbones the tool reads) under the flags given.
    The default --output-dir is runs/NAME for `python -m tools.NAME`, the name -h shows."""
    parser = argparse.ArgumentParser(prog=f"python -m tools.{os.path.basename(output_dir)}", description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("backbones", nargs="+", metavar="BACKBONE",
                        help="backbone.pth, checkpoint.pth or torchvision ResNet state_dict files")
    parser.add_argument("--tiny", action="store_true", help="the --tiny runs' sizes: " +
                        " ".join(f"{k}={v}" for k, v in tiny.items()))
    parser.add_argument("--output-dir", default=output_dir, help="where the figures and the JSON go")
    parser.add_argument("--coco", nargs=2, default=None, metavar=("JSON", "DIR"),
                        help="held-out images: a COCO annotation file and its image folder "
                             "(None: the toy world's val split)")
    parser.add_argument("--analysis-images", type=int, default=1000, help="held-out images")
    parser.add_argument("--image-size", type=int, default=224, help="the shorter side of the held-out images, pixels")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampled boxes and views")
    if add_flags is not None:
        add_flags(parser)
    args = parser.parse_args(argv)
    if args.tiny:
        parser.set_defaults(**tiny)
        args = parser.parse_args(argv)
    if args.analysis_images < 1 or args.image_size < 32:
        parser.error(f"--analysis-images {args.analysis_images} --image-size {args.image_size}: must be >= 1 and >= 32")
    return args


def load_backbone(path, flag):
    """(ResNetTrunk in eval mode, arch) from any weights file common.read_weights reads (InsLoc-FPN's fpn./box_head.
    keys ignored). Anything else: a one-line error naming `flag`."""
    state, arch = read_weights(path, flag)
    if arch is None:
        raise SystemExit(f"error: {flag} {path}: no torchvision ResNet weights in it")
    trunk = ResNetTrunk(arch)
    try:  # strict: every trunk tensor must be there, with its shape
        trunk.load_state_dict({k: v for k, v in state.items() if k in trunk.state_dict()})
    except RuntimeError as error:
        raise SystemExit(f"error: {flag} {path}: not a complete {arch} ({str(error).splitlines()[0]})")
    return trunk.eval().requires_grad_(False), arch


def backbone_label(path):
    """A backbone's name in figures: its folder and file name (runs/dupr/backbone.pth -> dupr/backbone.pth)."""
    return os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), os.path.basename(path))


class Progress:
    """The analysis tools' progress: `progress(done)` prints what, items done of total, elapsed and ETA, at
    most every `every` seconds and at the end."""

    def __init__(self, what, total, every=20.0):
        self.what, self.total, self.every, self.start = what, total, every, time.time()
        self.shown = self.start

    def __call__(self, done):
        now = time.time()
        if now - self.shown >= self.every or done == self.total:
            hms = lambda s: f"{int(s) // 3600}:{int(s) // 60 % 60:02d}:{int(s) % 60:02d}"
            elapsed = now - self.start
            print(f"{self.what}: {done}/{self.total} images, {hms(elapsed)} elapsed, "
                  f"eta {hms(elapsed / max(done, 1) * (self.total - done))}", flush=True)
            self.shown = now


class CocoSource(torch.utils.data.Dataset):
    """A COCO-format folder: `annotations` json + `images` directory. target = {"boxes" (n, 4) xyxy
    pixels, "labels" (n,) in 1..C, the json's category ids in sorted order}; crowd boxes skipped."""

    def __init__(self, annotations, images):
        try:
            with open(annotations) as f:
                coco = json.load(f)
            ids = sorted(c["id"] for c in coco["categories"])
            self.categories = [{c["id"]: c["name"] for c in coco["categories"]}[i] for i in ids]
            self.root, self.images, self.objects = images, coco["images"], {image["id"]: [] for image in coco["images"]}
            for a in coco["annotations"]:
                if not a.get("iscrowd", 0):  # bbox is xywh
                    self.objects[a["image_id"]].append(a["bbox"] + [ids.index(a["category_id"]) + 1])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SystemExit(f"error: --coco {annotations}: not a COCO annotation file "
                             f"({type(error).__name__}: {error})")
        if not os.path.isdir(images):
            raise SystemExit(f"error: --coco {images}: no such directory")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        with open(os.path.join(self.root, self.images[index]["file_name"]), "rb") as f:
            image = to_rgb(Image.open(f))
        objects = torch.tensor(self.objects[self.images[index]["id"]], dtype=torch.float32).reshape(-1, 5)
        boxes = torchvision.ops.box_convert(objects[:, :4], "xywh", "xyxy")
        return image, {"boxes": boxes, "labels": objects[:, 4].long()}


class HeldOut(torch.utils.data.Dataset):
    """The analysis tools' held-out images with boxes: the toy world's val split (generated at the
    trainers' size * 8 // 7) or a COCO-format folder (`coco` = (annotations json, image directory)),
    each rescaled so that its shorter side is `size`, boxes with it. `source`: the images as loaded."""

    def __init__(self, num_images, size, coco=None):
        self.source = ToyWorld(num_images, size * 8 // 7, "val") if coco is None else CocoSource(*coco)
        self.categories = list(TOY_CATEGORIES) if coco is None else self.source.categories
        self.num_images, self.size = min(num_images, len(self.source)), size

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        image, target = self.source[index]
        w, h = (round(side * self.size / min(image.size)) for side in image.size)
        xy = torch.tensor([w / image.width, h / image.height] * 2)
        return image.resize((w, h), Image.BILINEAR), {"boxes": target["boxes"] * xy, "labels": target["labels"]}


def draw_curves(curves, path, x_label, y_label, width=560, height=380):
    """A PIL line chart: curves = [(label, [(x in [0, 1], y), ...])], the y range from the data."""
    values = [y for _, points in curves for _, y in points]
    low, high = min(values) - 0.02, max(values) + 0.02
    left, right, top, bottom = 60, width - 20, 20, height - 60 - 14 * len(curves)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    at = lambda x, y: (left + x * (right - left), bottom - (y - low) / (high - low) * (bottom - top))
    draw.rectangle((left, top, right, bottom), outline="black")
    for i in range(6):  # ticks: x 0..1, y low..high
        draw.text((at(i / 5, low)[0] - 8, bottom + 4), f"{i / 5:.1f}", fill="black")
        draw.text((4, at(0, low + i / 5 * (high - low))[1] - 6), f"{low + i / 5 * (high - low):.2f}", fill="black")
    draw.text(((left + right) / 2 - 60, bottom + 18), x_label, fill="black")
    draw.text((left + 4, top + 4), y_label, fill="black")
    for c, (label, points) in enumerate(curves):
        draw.line([at(x, y) for x, y in points], fill=COLOURS[c % len(COLOURS)], width=2)
        draw.text((left, bottom + 36 + 14 * c), label, fill=COLOURS[c % len(COLOURS)])
    sheet.save(path)
