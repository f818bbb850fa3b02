"""Detection transfer: fine-tune torchvision Faster/Mask R-CNN from a pretrained backbone.

The protocol of MoCo (He et al., CVPR 2020, arXiv:1911.05722, sec. 4.2, appendix A.3) that DiLo, DUPR, DetCo
and InsLoc all report, on plain torchvision models instead of detectron2, with COCO and VOC evaluators in numpy.

    python detect_finetune.py --tiny --pretrained runs/dilo/backbone.pth      # toy world, CPU
    torchrun --nproc_per_node=8 detect_finetune.py --dataset voc --data-root /data/VOCdevkit \
        --pretrained runs/dupr/backbone.pth                                   # VOC07+12, R50-C4, 24k iters
    torchrun --nproc_per_node=8 detect_finetune.py --dataset coco --data-root /data/coco \
        --model mask-c4 --pretrained runs/detco/backbone.pth                  # COCO 1x (--schedule 2x)
    torchrun --nproc_per_node=8 detect_finetune.py --dataset coco --data-root /data/coco \
        --model mask-fpn --box-head 4conv1fc --pretrained runs/insloc/backbone.pth
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 \
        detect_finetune.py --dataset coco --data-root /data/coco --model mask-c4 --pretrained ...

Models (all layers trainable, BatchNorm everywhere, SyncBatchNorm under DDP on CUDA): `*-c4`: RPN on res4
(stride 16), aligned RoIAlign 14x14, box head = res5 (the pretrained layer4) + extra BN + avg pool (MoCo's
Res5ROIHeadsExtraNorm); `*-fpn`: ResNet + FPN with BN, Base-RCNN-FPN's heads or InsLoc's (--box-head 4conv1fc).
The protocol is detectron2's with MoCo's configs (C4; VOC, COCO) and InsLoc's (R50-FPN): schedules, lr 0.02
per 16 images, input sizes, RPN and RoI sampling, ROIAlignV2, initialisation, PreciseBN. It differs in:
smooth L1 box losses (torchvision's), warmup scaled with a shorter --iters, C4 input padded to 32 too, tiny
predicted boxes dropped, res5 run again for C4 masks, torchvision's mask pasting, bf16 on CUDA. Row by row:
docs/transfer_protocol.md. The evaluators give pycocotools' and detectron2's numbers to the last digit:
docs/evaluators.md. Outputs: checkpoint.pth (rerun = resume; at the end the trained model), log.jsonl,
detections.json (COCO results), metrics.json (every AP number + the protocol).

Expected (papers' detectron2 numbers, as collected in DUPR's Tables I and II): VOC07+12 R50-C4
AP / AP50 / AP75 = 57.0 / 82.4 / 63.6 from MoCo v2 (200 ep), 53.5 / 81.3 / 58.8 supervised;
COCO Mask R-CNN R50-C4 1x APbb / APmk = 38.9 / 34.2 from MoCo v2, 38.2 / 33.3 supervised.
"""
import argparse
import hashlib
import json
import math
import os
import pathlib
import re
import signal
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from PIL import Image
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from common import (ARCHS, IMAGENET_MEAN, IMAGENET_STD, TOY_CATEGORIES, ResNetTrunk, ToyWorld, agreed_checkpoint,
                    checkpoint_path, read_weights, resnet_arch, stop, to_rgb)

# --- Arguments ---

SCHEDULES = {  # spec "Schedules": per dataset, the MoCo protocol's iterations, lr steps, warmup and sizes
    "voc": dict(train_split="2007-trainval+2012-trainval", test_split="2007-test", iters=24000,  # MoCo's VOC config
                lr_steps=[18000, 22000], warmup=100, min_size=list(range(480, 801, 32)), test_size=800, max_size=1333),
    "coco": dict(train_split="train2017", test_split="val2017", iters=90000, lr_steps=[60000, 80000],  # detectron2's
                 warmup=1000, min_size=list(range(640, 801, 32)), test_size=800, max_size=1333),
    "synthetic": dict(train_split="train", test_split="val", iters=3000, lr_steps=[2000, 2600], warmup=300,
                      min_size=[192, 224, 256], test_size=256, max_size=512)}
# NOTE: the tiny recipe uses faster-fpn: on a 2-core CPU the C4 head (res5 per RoI) is ~10x slower
TINY = dict(dataset="synthetic", model="faster-fpn", arch="resnet18", image_size=96, train_images=400,
            test_images=50, iters=200, lr_steps=[150, 180], batch_size=2, lr=0.04, min_size=[80, 96], test_size=96,
            max_size=160, roi_batch_size=32, precise_bn_iters=20, workers=1, print_freq=10, save_freq=100)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" except where the default is None: those help strings name the per-dataset default."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def number(kind, low, strict=False):
    """argparse type: a `kind` >= low (> low if strict), else one argparse error line."""
    def parse(text):
        value = kind(text)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages
    return parse


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Faster/Mask R-CNN detection transfer", formatter_class=HelpFormatter)
    positive, count = number(int, 1), number(int, 0)
    parser.add_argument("--dataset", default="voc", choices=["voc", "coco", "synthetic"], help="synthetic: toy world")
    parser.add_argument("--data-root", default=None, help="VOCdevkit, or a folder with <split>/ + "
                        "[annotations/]instances_<split>.json (default: none; voc and coco need it)")
    parser.add_argument("--train-split", default=None, help="default: voc 2007-trainval+2012-trainval, coco train2017")
    parser.add_argument("--test-split", default=None, help="default: voc 2007-test, coco val2017")
    parser.add_argument("--model", default="faster-c4", choices=["faster-c4", "faster-fpn", "mask-c4", "mask-fpn"],
                        help="Faster or Mask R-CNN, on res4 (C4, MoCo's) or on an FPN")
    parser.add_argument("--box-head", default="2mlp", choices=["2mlp", "4conv1fc"],
                        help="FPN box head; 4conv1fc: InsLoc's, BN + an extra BN after fc1 (and BN in the mask head)")
    parser.add_argument("--arch", default="resnet50", choices=ARCHS, help="torchvision ResNet")
    parser.add_argument("--pretrained", default="none",
                        help="this repo's backbone.pth / checkpoint.pth, torchvision or MoCo file, or 'none'")
    parser.add_argument("--load", default="all", choices=["backbone", "all"], help="all: also InsLoc's fpn., box_head.")
    parser.add_argument("--allow-missing", action="store_true", help="allow backbone keys missing from --pretrained")
    parser.add_argument("--schedule", default="1x", choices=["1x", "2x"], help="COCO: 90k or 180k iterations")
    parser.add_argument("--iters", type=positive, default=None,
                        help="training iterations (default: voc 24000, coco 90000, synthetic 3000)")
    parser.add_argument("--lr-steps", type=positive, nargs="+", default=None,
                        help="iterations where lr is multiplied by 0.1 (default: voc 18000 22000, coco 60000 80000)")
    parser.add_argument("--warmup", type=count, default=None, help="linear warmup iterations (default: voc 100, "
                        "coco 1000, synthetic 300, scaled by --iters / the dataset's iterations)")
    parser.add_argument("--batch-size", type=positive, default=16, help="global batch (images) over all processes")
    parser.add_argument("--lr", type=number(float, 0, strict=True), default=0.02,
                        help="base lr per 16 images (scaled linearly)")
    parser.add_argument("--wd", type=number(float, 0), default=1e-4, help="weight decay (not on norm layers)")
    parser.add_argument("--min-size", type=positive, nargs="+", default=None, help="training short sides, pixels, "
                        "one at random per image (default: voc 480..800, coco 640..800, step 32)")
    parser.add_argument("--test-size", type=positive, default=None,
                        help="test short side, pixels (default: 800; synthetic 256)")
    parser.add_argument("--max-size", type=positive, default=None,
                        help="cap on the long side, pixels (default: 1333; synthetic 512)")
    parser.add_argument("--roi-batch-size", type=positive, default=512, help="RoIs sampled per image for the box head")
    parser.add_argument("--max-detections", type=positive, default=100, help="detections per image (COCO's maxDets)")
    parser.add_argument("--precise-bn-iters", type=count, default=200, help="PreciseBN: training batches that "
                        "recompute BN statistics before evaluation (at most --iters); 0 = off")
    parser.add_argument("--image-size", type=number(int, 32), default=256, help="synthetic: image side, pixels")
    parser.add_argument("--train-images", type=positive, default=5000, help="synthetic: training images")
    parser.add_argument("--test-images", type=count, default=None,
                        help="evaluate on the first N test images, 0 = all (default: all; synthetic 500)")
    parser.add_argument("--workers", type=count, default=4, help="data loader workers per process")
    parser.add_argument("--output-dir", default="runs/detect",
                        help="checkpoint.pth, log.jsonl, detections.json, metrics.json")
    parser.add_argument("--resume", default="auto", help="'auto' (output-dir/checkpoint.pth if any), a path, or 'none'")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the (resumed or pretrained) model and exit")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for CUDA)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="NHWC weights, so NHWC feature maps from the first conv on (default: on for CUDA)")
    parser.add_argument("--print-freq", type=positive, default=20, help="iterations between log lines")
    parser.add_argument("--save-freq", type=positive, default=2000, help="iterations between checkpoints")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data order, flips and initialisation")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU-sized recipe: " + " ".join(f"{k}={v}" for k, v in TINY.items()))
    args = parser.parse_args(argv)
    if args.tiny:  # the tiny recipe replaces defaults only: explicit flags still win
        parser.set_defaults(**TINY)
        args = parser.parse_args(argv)
    schedule = dict(SCHEDULES[args.dataset])
    if args.dataset == "coco" and args.schedule == "2x":
        schedule.update(iters=180000, lr_steps=[120000, 160000])
    args.precise_bn_iters = min(args.precise_bn_iters, args.iters or schedule["iters"])  # a 1-iteration run needs 1
    if args.warmup is None:  # NOTE: detectron2 does not scale warmup; here it does when --iters shortens the schedule
        args.warmup = round(schedule["warmup"] * (args.iters or schedule["iters"]) / schedule["iters"])
    for name, value in schedule.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.test_images = args.test_images or (500 if args.dataset == "synthetic" else 0)  # the toy world: no fixed set
    if args.model.startswith("mask") and args.dataset == "voc":
        parser.error(f"--model {args.model} needs instance masks: use --dataset coco or synthetic")
    if args.box_head == "4conv1fc" and not args.model.endswith("fpn"):
        parser.error(f"--box-head 4conv1fc is an FPN head: use --model faster-fpn or mask-fpn, not {args.model}")
    if args.dataset != "synthetic" and not os.path.isdir(args.data_root or ""):
        parser.error(f"--data-root {args.data_root!r}: no such directory (needed for --dataset {args.dataset})")
    return args


# --- Data: VOC (XML), COCO (json: polygons, RLE, crowds), the synthetic toy world ---
# Every item is (PIL RGB image, target {"boxes" xyxy, "labels" 1..C, ["masks"], "image_id"}).

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


class VOCDetection(torch.utils.data.Dataset):
    """VOCdevkit; split "2007-trainval+2012-trainval" = the union of those ImageSets/Main lists. Boxes: (xmin - 1,
    ymin - 1, xmax, ymax) as detectron2 reads VOC's 1-based pixels; "difficult" ones train, the evaluator ignores."""

    def __init__(self, root, split, train):
        self.items, self.train = [], train
        layout = "VOCdevkit/VOC2007/{Annotations,JPEGImages,ImageSets/Main} (and VOC2012 for 07+12)"
        for part in split.split("+"):
            if not re.fullmatch(r"\d{4}-\w+", part):
                raise SystemExit(f"error: split {split!r}: expected YEAR-SET parts joined by '+', "
                                 "e.g. 2007-trainval+2012-trainval")
            year, name = part.split("-")
            folder = os.path.join(root, f"VOC{year}")
            listing = os.path.join(folder, "ImageSets", "Main", f"{name}.txt")
            if not os.path.isfile(listing):
                raise SystemExit(f"error: --data-root {root} has no VOC{year}/ImageSets/Main/{name}.txt; "
                                 f"expected {layout}")
            with open(listing) as f:
                names = [line.strip() for line in f if line.strip()]
            for kind, extension in (("JPEGImages", "jpg"), ("Annotations", "xml")):  # before training, not hours in
                missing = [n for n in names if not os.path.isfile(os.path.join(folder, kind, f"{n}.{extension}"))]
                if missing:
                    raise SystemExit(f"error: {len(missing)} of the {len(names)} names in {listing} have no "
                                     f"VOC{year}/{kind}/NAME.{extension} (e.g. {missing[0]}.{extension}); "
                                     f"expected {layout}")
            self.items += [(folder, n) for n in names]
        self.num_classes = len(VOC_CLASSES)

    def __len__(self):
        return len(self.items)

    def annotation(self, index):
        folder, name = self.items[index]
        root = ElementTree.parse(os.path.join(folder, "Annotations", f"{name}.xml")).getroot()
        objects = root.findall("object")
        boxes = [[float(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")] for o in objects]
        labels = [VOC_CLASSES.index(o.find("name").text.strip()) + 1 for o in objects]
        difficult = [int(o.find("difficult").text) if o.find("difficult") is not None else 0 for o in objects]
        width, height = (int(root.find("size").find(side).text) for side in ("width", "height"))
        return np.array(boxes).reshape(-1, 4), labels, difficult, (width, height)

    def aspect_groups(self):
        return [int(w >= h) for w, h in (self.annotation(i)[3] for i in range(len(self)))]

    def __getitem__(self, index):
        folder, name = self.items[index]
        image = to_rgb(Image.open(os.path.join(folder, "JPEGImages", f"{name}.jpg")))
        boxes, labels, difficult, _ = self.annotation(index)
        boxes[:, :2] -= 1
        return image, {"boxes": torch.tensor(boxes, dtype=torch.float32),
                       "labels": torch.tensor(labels, dtype=torch.int64),
                       "difficult": torch.tensor(difficult, dtype=torch.bool), "image_id": index}  # place in the split


class COCODetection(torch.utils.data.Dataset):
    """COCO-format json (`root/[annotations/]instances_<split>.json`, images in `root/<split>/`), labels 1..C in
    sorted category-id order. Training, as detectron2: no crowds; boxes clipped, kept unless w or h <= 1e-5."""

    def __init__(self, root, split, train):
        path = os.path.join(root, "annotations", f"instances_{split}.json")
        path = path if os.path.exists(path) else os.path.join(root, f"instances_{split}.json")
        layout = "coco/annotations/instances_<split>.json (or coco/instances_<split>.json) and images in coco/<split>/"
        if not os.path.exists(path):
            raise SystemExit(f"error: --data-root {root} has no annotations/instances_{split}.json (nor "
                             f"instances_{split}.json); expected {layout}")
        try:
            with open(path) as f:
                self.coco = json.load(f)
            assert all(isinstance(self.coco.get(key), list) for key in ("images", "annotations", "categories"))
        except (ValueError, UnicodeDecodeError, AssertionError, AttributeError):
            raise SystemExit(f"error: {path} is not a COCO annotation file (a JSON object with 'images', "
                             "'annotations' and 'categories' lists)") from None
        self.folder, self.train = os.path.join(root, split), train
        missing = [image["file_name"] for image in self.coco["images"]
                   if not os.path.isfile(os.path.join(self.folder, image["file_name"]))]
        if missing:  # before training, not hours in
            raise SystemExit(f"error: {len(missing)} of the {len(self.coco['images'])} images that {path} names "
                             f"are not in {self.folder} (e.g. {missing[0]}); expected {layout}")
        self.category_ids = sorted(c["id"] for c in self.coco["categories"])
        self.label, self.num_classes = {c: n + 1 for n, c in enumerate(self.category_ids)}, len(self.category_ids)
        self.annotations = {image["id"]: [] for image in self.coco["images"]}
        sizes = {image["id"]: (image["width"], image["height"]) for image in self.coco["images"]}
        for a in self.coco["annotations"]:
            if a["image_id"] in self.annotations and not (
                    train and (a.get("iscrowd", 0) or empty_box(a["bbox"], *sizes[a["image_id"]]))):
                self.annotations[a["image_id"]].append(a)
        self.images = [i for i in sorted(self.coco["images"], key=lambda i: i["id"])
                       if self.annotations[i["id"]] or not train]

    def __len__(self):
        return len(self.images)

    def aspect_groups(self):
        return [int(i["width"] >= i["height"]) for i in self.images]

    def __getitem__(self, index):
        info = self.images[index]
        with open(os.path.join(self.folder, info["file_name"]), "rb") as f:
            image = to_rgb(Image.open(f))
        annotations = self.annotations[info["id"]]
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2], boxes[:, 1::2] = boxes[:, 0::2].clamp(0, image.width), boxes[:, 1::2].clamp(0, image.height)
        labels = torch.tensor([self.label[a["category_id"]] for a in annotations], dtype=torch.int64)
        target = {"boxes": boxes, "labels": labels, "image_id": info["id"]}
        if "segmentation" in (annotations[0] if annotations else {}):  # then there is at least one mask
            masks = [mask_from_segmentation(a["segmentation"], image.height, image.width) for a in annotations]
            target["masks"] = torch.from_numpy(np.stack(masks))
        return image, target


def empty_box(box, width, height):
    """detectron2's Boxes.clip + nonempty(1e-5) on a COCO xywh box."""
    x, y, w, h = box
    return min(x + w, width) - max(x, 0) <= 1e-5 or min(y + h, height) - max(y, 0) <= 1e-5


class SyntheticDetection(torch.utils.data.Dataset):
    """The toy world (common.ToyWorld), 8 shape categories; evaluated with the COCO evaluator."""

    def __init__(self, num_images, image_size, split):
        self.world = ToyWorld(num_images, image_size, split, seed=0)
        self.num_classes, self.category_ids = len(TOY_CATEGORIES), list(range(1, len(TOY_CATEGORIES) + 1))

    def __len__(self):
        return len(self.world)

    def aspect_groups(self):  # NOTE: one group: toy images are all between 3:4 and 4:3
        return [0] * len(self)

    def __getitem__(self, index):
        image, target = self.world[index]
        return image, {**{key: target[key] for key in ("boxes", "labels", "masks")}, "image_id": index + 1}


def open_dataset(args, train):
    split = args.train_split if train else args.test_split
    if args.dataset == "synthetic" and not args.data_root:
        return SyntheticDetection(args.train_images if train else args.test_images, args.image_size, split)
    return (VOCDetection if args.dataset == "voc" else COCODetection)(args.data_root, split, train)


class DetectionTransform:
    """PIL image -> float tensor in [0, 1], flipped as the sampler drew; the model's transform resizes, normalises."""

    def __init__(self, dataset, train):
        self.dataset, self.train = dataset, train

    def __getitem__(self, item):
        index, flip = item if self.train else (item, False)  # training items are (index, flip) from the sampler
        image, target = self.dataset[index]
        image = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, H, W)
        if flip:
            image, target = image.flip(-1), {**target, "boxes": target["boxes"].clone()}
            target["boxes"][:, [0, 2]] = image.shape[-1] - target["boxes"][:, [2, 0]]  # x' = W - x, x1 and x2 swap
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return image, target


class GroupedInfiniteSampler(torch.utils.data.Sampler):
    """Endless per-rank batches of (index, flip): each epoch's permutation and flips, seeded by (seed, epoch), split
    over ranks; landscape / portrait images fill separate batches; `start` batches are skipped (an exact resume)."""

    def __init__(self, groups, batch_size, rank, world_size, seed, start=0):
        self.groups, self.batch_size, self.rank, self.world_size = groups, batch_size, rank, world_size
        self.seed, self.start = seed, start

    def __iter__(self):
        buckets, produced, epoch = {}, 0, 0
        while True:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.groups), generator=generator)
            flips = (torch.rand(len(self.groups), generator=generator) < 0.5).tolist()  # per image and epoch
            for index in order[self.rank::self.world_size].tolist():
                bucket = buckets.setdefault(self.groups[index], [])
                bucket.append((index, flips[index]))
                if len(bucket) == self.batch_size:
                    if produced >= self.start:
                        yield list(bucket)
                    produced += 1
                    bucket.clear()
            epoch += 1


def collate(batch):  # detection batches are lists: images differ in size
    return tuple(zip(*batch))


# --- Model: torchvision Faster/Mask R-CNN with the MoCo C4 parts, or ResNet + FPN ---


class C4Backbone(nn.Module):
    """Stem + res2..res4 (stride 16); the trunk's layer4 moves to the box head."""

    def __init__(self, trunk):
        super().__init__()
        self.body, self.out_channels = trunk, trunk.channels[2]

    def forward(self, x):
        return self.body.forward_to_res4(x)  # (N, C4, H/16, W/16)


class AlignedRoIAlign(torchvision.ops.MultiScaleRoIAlign):
    """detectron2's ROIAlignV2: aligned=True, sampling ratio 0 (adaptive), on one map (C4) or on FPN level floor(4 +
    log2(sqrt(area) / 224 + 1e-8)) in P2..P5. torchvision's MultiScaleRoIAlign (FasterRCNN's type) is not aligned."""

    def __init__(self, output_size, strides):
        super().__init__([str(level) for level in range(len(strides))], output_size, sampling_ratio=0)
        self.output_size, self.strides = output_size, strides

    def forward(self, features, proposals, image_shapes):
        rois = torch.cat([torch.cat([torch.full_like(p[:, :1], i), p], 1)
                          for i, p in enumerate(proposals)])  # (R, 5): image index, box
        maps = [features[name] for name in self.featmap_names]
        level = torch.zeros(len(rois), dtype=torch.int64, device=rois.device)
        if len(maps) > 1:
            size = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).sqrt()
            first = int(math.log2(self.strides[0]))
            level = (torch.floor(4 + torch.log2(size / 224 + 1e-8)).clamp(first, first + len(maps) - 1) - first).long()
        out = maps[0].new_zeros((len(rois), maps[0].shape[1], self.output_size, self.output_size))  # (R, C, S, S)
        for k, (feature, stride) in enumerate(zip(maps, self.strides)):
            index = torch.where(level == k)[0]
            out[index] = torchvision.ops.roi_align(feature, rois[index], self.output_size, 1.0 / stride,
                                                   sampling_ratio=0, aligned=True).to(out.dtype)
        return out


class Float32BoxCoder(torchvision.models.detection._utils.BoxCoder):
    """NOTE: torchvision decodes in the deltas' dtype: under bf16 autocast, proposals, ground truth (cast to theirs)
    and detections would be bf16, 4-8 px apart at 512-2048 px. detectron2's apply_deltas decodes in fp32, as this."""

    def decode_single(self, rel_codes, boxes):
        return super().decode_single(rel_codes.float(), boxes.float())


class Res5BoxHead(nn.Module):
    """MoCo's Res5ROIHeadsExtraNorm: res5 (the pretrained layer4; stride 2: 14x14 -> 7x7), extra BN, average pool."""

    def __init__(self, res5, channels):
        super().__init__()
        self.res5, self.norm = res5, nn.BatchNorm2d(channels)

    def features(self, x):
        return self.norm(self.res5(x))  # (R, C5, 7, 7)

    def forward(self, x):
        return self.features(x).mean(dim=(2, 3))  # (R, C5)


class SharedRes5MaskHead(nn.Module):
    """The C4 mask branch: the box head's res5 (same weights) on the positive RoIs. NOTE: detectron2 reuses the box
    pass's res5 features; torchvision's RoIHeads pools mask RoIs apart, so res5 runs again (its BN sees positives)."""

    def __init__(self, box_head):
        super().__init__()
        self.__dict__["box_head"] = box_head  # not a submodule: its parameters belong to roi_heads.box_head

    def forward(self, x):
        return self.box_head.features(x)  # (R, C5, 7, 7)


class FPNBackbone(nn.Module):
    """ResNet + torchvision FeaturePyramidNetwork (BN) over c2..c5, 256 channels, max-pooled P6."""

    def __init__(self, trunk):
        super().__init__()
        self.body, self.out_channels = trunk, 256
        self.fpn = FeaturePyramidNetwork(trunk.channels, 256, LastLevelMaxPool(), norm_layer=nn.BatchNorm2d)  # + P6

    def forward(self, x):
        return self.fpn(OrderedDict((str(level), c) for level, c in enumerate(self.body(x))))  # "0".."3", "pool"


class ConvFCHeadExtraNorm(FastRCNNConvFCHead):
    """InsLoc's FastRCNNConvFCHeadExtraNorm: 4 x (conv 3x3 + BN + ReLU), fc1 (1024) + ReLU, extra BN. Modules 0..5
    are insloc.py's exported `box_head.`; the extra BN (7) is new at fine-tuning, as in InsLoc's release."""

    def __init__(self):
        super().__init__((256, 7, 7), [256] * 4, [1024], norm_layer=nn.BatchNorm2d)
        self.append(nn.BatchNorm1d(1024))  # (R, 1024)


def build_model(args, num_classes):
    """num_classes excludes the background. Every layer is trainable, plain BatchNorm everywhere."""
    trunk = ResNetTrunk(args.arch)
    C5 = trunk.channels[3]
    options = dict(min_size=tuple(args.min_size), max_size=args.max_size, image_mean=IMAGENET_MEAN,
                   image_std=IMAGENET_STD, box_batch_size_per_image=args.roi_batch_size,
                   box_detections_per_img=args.max_detections)
    if args.model.endswith("c4"):
        box_head = Res5BoxHead(trunk.layer4, C5)
        del trunk.layer4  # res5 now lives in the box head (its keys: roi_heads.box_head.res5.*)
        backbone = C4Backbone(trunk)
        options.update(rpn_anchor_generator=AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),)),
                       rpn_pre_nms_top_n_train=12000, rpn_post_nms_top_n_train=2000, rpn_pre_nms_top_n_test=6000,
                       rpn_post_nms_top_n_test=1000, box_roi_pool=AlignedRoIAlign(14, [16]), box_head=box_head,
                       box_predictor=FastRCNNPredictor(C5, num_classes + 1))
        if args.model == "mask-c4":  # 7x7 res5 features -> 2x transposed conv (256) -> 1x1 class conv: 14x14 masks
            options.update(mask_roi_pool=AlignedRoIAlign(14, [16]), mask_head=SharedRes5MaskHead(box_head),
                           mask_predictor=MaskRCNNPredictor(C5, 256, num_classes + 1))
    else:  # Base-RCNN-FPN: RoIs pooled 7x7 (boxes) / 14x14 (masks) from P2..P5; 1000 proposals per image (training)
        backbone = FPNBackbone(trunk)
        options.update(rpn_post_nms_top_n_train=1000, box_roi_pool=AlignedRoIAlign(7, [4, 8, 16, 32]))
        box_head = ConvFCHeadExtraNorm() if args.box_head == "4conv1fc" else TwoMLPHead(256 * 7 * 7, 1024)
        options.update(box_head=box_head, box_predictor=FastRCNNPredictor(1024, num_classes + 1))
        if args.model == "mask-fpn":  # 4 x (conv 3x3 [+ BN] + ReLU) -> 2x deconv -> 1x1 class conv: 28x28 masks
            norm = nn.BatchNorm2d if args.box_head == "4conv1fc" else None  # InsLoc's has BN (ROI_MASK_HEAD.NORM)
            options.update(mask_roi_pool=AlignedRoIAlign(14, [4, 8, 16, 32]),
                           mask_head=MaskRCNNHeads(256, [256] * 4, 1, norm_layer=norm),
                           mask_predictor=MaskRCNNPredictor(256, 256, num_classes + 1))
    detector = (MaskRCNN if args.model.startswith("mask") else FasterRCNN)(backbone, **options)
    detector.rpn.box_coder = Float32BoxCoder((1.0, 1.0, 1.0, 1.0))  # torchvision's weights
    detector.roi_heads.box_coder = Float32BoxCoder((10.0, 10.0, 5.0, 5.0))
    detectron2_init(detector.roi_heads, fpn=args.model.endswith("fpn"))
    return detector


def detectron2_init(heads, fpn):
    """detectron2's init where torchvision's differs: class scores N(0, 0.01), box deltas and mask logits N(0, 0.001),
    zero biases; FPN box heads: fcs c2_xavier_fill (kaiming uniform, a=1), convs c2_msra_fill (kaiming normal)."""
    layers = [(heads.box_predictor.cls_score, 0.01), (heads.box_predictor.bbox_pred, 0.001)]
    layers += [(heads.mask_predictor.mask_fcn_logits, 0.001)] if heads.has_mask() else []
    for layer, std in layers:
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)
    for m in heads.box_head.modules() if fpn else []:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, a=1)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
            nn.init.zeros_(m.bias)


def detector_key(key, model_keys):
    """torchvision ResNet / InsLoc key -> the detector's key (None if the model has no such tensor)."""
    c4 = "backbone.body.layer4.0.conv1.weight" not in model_keys  # res5 (layer4) is in the box head
    new = ("backbone." + key if key.startswith("fpn.") else "roi_heads." + key if key.startswith("box_head.")
           else "roi_heads.box_head.res5." + key[len("layer4."):] if key.startswith("layer4.") and c4
           else "backbone.body." + key)
    return new if new in model_keys else None


def load_pretrained(model, args, source=None):
    """Load --pretrained (`source`: common.read_weights' keys) into the detector. Missing backbone keys, ResNet keys
    the model lacks and wrong shapes stop, naming the ResNet the file looks like; key lists go to log.jsonl."""
    if args.pretrained == "none":
        return {"missing": [], "unexpected": []}
    source = read_weights(args.pretrained, "--pretrained")[0] if source is None else source
    target = model.state_dict()
    if args.load == "backbone":
        source = {k: v for k, v in source.items() if not k.startswith(("fpn.", "box_head."))}
    arch = resnet_arch(source)  # from the blocks per stage and the block type of its layer keys
    hint = f"it looks like a {arch} backbone: pass --arch {arch}" if arch and arch != args.arch else "wrong --arch?"
    loaded, unexpected = {}, []
    for key, value in source.items():
        new = detector_key(key, target)
        if new is None:
            unexpected.append(key)
        elif target[new].shape != value.shape:
            raise SystemExit(f"error: --pretrained {args.pretrained}: {key} has shape {tuple(value.shape)}, "
                             f"the {args.arch} {args.model} needs {tuple(target[new].shape)}; {hint}")
        else:
            loaded[new] = value
    # NOTE: BN's num_batches_tracked is a counter, not a weight (old torchvision files lack it)
    backbone = [k for k in target if k.startswith(("backbone.body.", "roi_heads.box_head.res5."))
                and "num_batches_tracked" not in k]
    missing = [k for k in backbone if k not in loaded]
    summary = lambda keys: f"{len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})" if keys else "none"
    if args.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        record = {"pretrained": args.pretrained, "loaded": sorted(loaded), "missing": missing, "unexpected": unexpected}
        with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"loaded {len(loaded)} tensors from {args.pretrained}; missing backbone keys: {summary(missing)}; "
              f"not loaded: {summary(unexpected)}; full lists in {os.path.join(args.output_dir, 'log.jsonl')}")
    extra = [k for k in unexpected if k.startswith(("conv1.", "bn1.", "layer"))]  # ResNet keys this --arch lacks
    if extra:
        raise SystemExit(f"error: --pretrained {args.pretrained} has {len(extra)} ResNet keys that a {args.arch} lacks "
                         f"(e.g. {extra[0]}); {hint}")
    if missing and not args.allow_missing:
        raise SystemExit(f"error: {len(missing)} backbone keys missing from {args.pretrained} (e.g. {missing[0]}); "
                         f"{hint[:-1] + ', or' if hint.endswith('?') else hint + '; or'} pass --allow-missing")
    model.load_state_dict(loaded, strict=False)
    return {"missing": missing, "unexpected": unexpected}


def parameter_groups(model, wd):
    """No weight decay on norm layers (their scale is not a weight to shrink)."""
    norm_types = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)
    norm = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in norm], "weight_decay": wd},
            {"params": [p for p in params if id(p) in norm], "weight_decay": 0.0}]


# --- Training loop ---


def learning_rate(iteration, args):
    """detectron2's WarmupMultiStepLR: linear warmup from 0.001x, then x0.1 at each of --lr-steps."""
    factor = 0.1 ** sum(iteration >= step for step in args.lr_steps)
    if iteration < args.warmup:
        alpha = iteration / args.warmup
        factor *= 0.001 * (1 - alpha) + alpha
    return args.lr_actual * factor


def train(model, ddp_model, batches, optimizer, start, args, log, interrupt):
    model.train()
    begin = end = time.time()
    for iteration in range(start, args.iters):
        try:
            images, targets = next(batches)
        except (RuntimeError, OSError):  # a loader worker was killed (SIGKILL, or a signal before the handler)
            if not interrupt.requested:
                raise
            stop_training(model, optimizer, iteration, iteration + 1, args)
        data_time = time.time() - end
        lr = learning_rate(iteration, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = [image.to(args.device, non_blocking=True) for image in images]
        targets = [{k: v.to(args.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.amp):
            losses = ddp_model(images, targets)
        loss = sum(losses.values())
        if not math.isfinite(loss.item()):
            raise SystemExit(f"error: loss is {loss.item()} at iteration {iteration}; "
                             f"the last good checkpoint in {args.output_dir} is kept")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_time, end = time.time() - end, time.time()
        if (iteration + 1) % args.save_freq == 0 and iteration + 1 < args.iters:  # the final one follows PreciseBN
            save_checkpoint(model, optimizer, iteration + 1, args)
        if iteration % args.print_freq == 0 or iteration + 1 == args.iters:
            done = iteration + 1 - start
            log({"iteration": iteration, "iters": args.iters, "lr": lr, "loss": loss.item(),
                 **{k: v.item() for k, v in losses.items()}, "img_per_s": args.batch_size / step_time,
                 "it_per_s": done / (end - begin), "data_time": data_time, "step_time": step_time,
                 "eta_s": (end - begin) / done * (args.iters - iteration - 1)})
        if interrupt.agreed(args) and iteration + 1 < args.iters:  # a signal during this iteration: keep it, stop
            stop_training(model, optimizer, iteration + 1, iteration + 1, args)


def stop_training(model, optimizer, done, at, args):
    """After a signal: save the `done` iterations, then one line (iterations count from 1, as progress lines)."""
    save_checkpoint(model, optimizer, done, args)
    raise SystemExit(f"interrupted at iteration {at}; checkpoint has {done} iterations; rerun the same command to "
                     "resume" if args.is_main else 1)


@torch.no_grad()
def precise_bn(model, batches, args):
    """PreciseBN (MoCo's and InsLoc's TEST.PRECISE_BN): each BN's running mean / var = the plain average of its batch
    statistics over --precise-bn-iters batches of the final weights, then over processes (docs/transfer_protocol.md)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not args.precise_bn_iters or not norms:
        return
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after n batches, running = (1/n) sum of the n batch statistics
    model.train()
    for _ in range(args.precise_bn_iters):
        images, targets = next(batches)
        images = [image.to(args.device, non_blocking=True) for image in images]
        targets = [{k: v.to(args.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.amp):
            model(images, targets)  # training-mode forward: same RoI sampling as training, losses unused
    for m, (momentum, tracked) in zip(norms, saved):
        m.momentum, m.num_batches_tracked = momentum, tracked
        if args.world_size > 1:
            for statistic in (m.running_mean, m.running_var):
                dist.all_reduce(statistic)
                statistic /= args.world_size
    if args.is_main:
        print(f"precise BN: statistics of {len(norms)} BatchNorm layers recomputed over {args.precise_bn_iters} "
              "batches", flush=True)


# --- Evaluation: detections in COCO results format; the numpy evaluators are at the end of the file ---


@torch.no_grad()
def predict(model, dataset, args):
    """This rank's share of the test set -> (COCO-format detections, ground truth records)."""
    model.eval()
    transform, train_sizes = model.transform, model.transform.min_size
    transform.min_size = (args.test_size,)
    indices = list(range(min(len(dataset), args.test_images or len(dataset))))[args.rank::args.world_size]
    subset = torch.utils.data.Subset(DetectionTransform(dataset, False), indices)
    loader = torch.utils.data.DataLoader(subset, batch_size=2, num_workers=args.workers, collate_fn=collate)
    detections, truths = [], []
    for images, targets in loader:
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.amp):
            outputs = model([image.to(args.device) for image in images])
        for image, target, output in zip(images, targets, outputs):
            truths.append({"image_id": target["image_id"], "height": image.shape[1], "width": image.shape[2],
                           **{k: v.tolist() for k, v in target.items() if k in ("boxes", "labels", "difficult")},
                           "segmentations": [rle_encode(m) for m in target["masks"].numpy()]
                           if isinstance(dataset, SyntheticDetection) else None})  # COCO json has its own
            boxes = output["boxes"].float().cpu().tolist()
            masks = (output["masks"][:, 0] > 0.5).cpu().numpy() if "masks" in output else [None] * len(boxes)
            for box, score, label, mask in zip(boxes, output["scores"].tolist(), output["labels"].tolist(), masks):
                category = dataset.category_ids[label - 1] if hasattr(dataset, "category_ids") else label  # VOC: 1..20
                detection = {"image_id": target["image_id"], "category_id": category,
                             "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score}
                if mask is not None:
                    detection["segmentation"] = rle_encode(mask)
                detections.append(detection)
    transform.min_size = train_sizes
    model.train()
    return detections, truths


def evaluate(model, dataset, args):
    """Detections of all ranks, evaluated on the main process -> {"bbox": {...}, ["segm": {...}]} in percent."""
    detections, truths = predict(model, dataset, args)
    if args.world_size > 1:
        gathered = [None] * args.world_size
        dist.all_gather_object(gathered, (detections, truths))
        detections, truths = [d for part, _ in gathered for d in part], [t for _, part in gathered for t in part]
    if not args.is_main:
        return None
    start = time.time()
    if args.dataset == "voc":
        metrics = {"bbox": voc_evaluate(*voc_inputs(truths, detections), len(VOC_CLASSES))}
        metrics["bbox"].pop("per_class")
    else:
        gt = coco_ground_truth(dataset, truths)
        percent = lambda stats: {name: 100 * s if s >= 0 else -1 for name, s in zip(COCO_STATS, stats)}  # -1: undefined
        without = lambda key: [{k: v for k, v in d.items() if k != key} for d in detections]
        metrics = {"bbox": percent(coco_evaluate(gt, without("segmentation"))["stats"])}
        if args.model.startswith("mask"):  # segm on mask areas: drop the boxes, as detectron2 does
            metrics["segm"] = percent(coco_evaluate(gt, without("bbox"), "segm")["stats"])
    metrics["unit"] = "percent"  # AP and AR as detectron2 prints them: 0-100; -1 = undefined (no such objects)
    metrics["eval_seconds"], metrics["test_images"] = time.time() - start, len(truths)
    with open(os.path.join(args.output_dir, "detections.json"), "w") as f:
        json.dump(detections, f)
    return metrics


def voc_inputs(truths, detections):
    """Ground truth and COCO-format detections -> voc_evaluate's per-image lists in VOC's 1-based pixels, rounded
    as detectron2's evaluator writes them ("{score:.3f} {xmin:.1f} ..."): that changes AP (docs/evaluators.md)."""
    by_image = {t["image_id"]: {"boxes": [], "scores": [], "labels": []} for t in truths}
    for d in detections:
        x, y, w, h = d["bbox"]
        by_image[d["image_id"]]["boxes"].append([float(f"{v:.1f}") for v in (x + 1, y + 1, x + w, y + h)])
        by_image[d["image_id"]]["scores"].append(float(f"{d['score']:.3f}"))
        by_image[d["image_id"]]["labels"].append(d["category_id"])
    gt = [{"boxes": np.array(t["boxes"]).reshape(-1, 4) + [1, 1, 0, 0], "labels": t["labels"],
           "difficult": t["difficult"]} for t in truths]
    return gt, [by_image[t["image_id"]] for t in truths]


def coco_ground_truth(dataset, truths):
    """The evaluated images' COCO ground truth: the json's own annotations, or built from the toy world."""
    evaluated = {t["image_id"] for t in truths}
    categories = [{"id": c, "name": str(c)} for c in dataset.category_ids]
    if isinstance(dataset, COCODetection):
        return {"images": [i for i in dataset.coco["images"] if i["id"] in evaluated],
                "categories": dataset.coco["categories"],
                "annotations": [a for a in dataset.coco["annotations"] if a["image_id"] in evaluated]}
    images, annotations = [], []
    for t in truths:
        images.append({"id": t["image_id"], "height": t["height"], "width": t["width"]})
        for (x1, y1, x2, y2), label, segmentation in zip(t["boxes"], t["labels"], t["segmentations"]):
            annotations.append({"id": len(annotations) + 1, "image_id": t["image_id"], "category_id": label,
                                "iscrowd": 0, "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": segmentation,
                                "area": segmentation_area(segmentation, t["height"], t["width"])})
    return {"images": images, "annotations": annotations, "categories": categories}


# --- Plumbing: distributed setup, checkpoints, logging. Same shape as in dilo.py. ---


class Interrupt:
    """SIGINT / SIGTERM (Ctrl-C, a scheduler, torchrun). In training the first one lets the iteration finish; train()
    saves it and stops with one line. A second one, or one at another time, exits at once (the checkpoint stays)."""

    def __init__(self):
        self.requested, self.training, self.pid = False, False, os.getpid()
        for name in (signal.SIGINT, signal.SIGTERM):
            signal.signal(name, self)

    def __call__(self, signum, frame):
        if os.getpid() != self.pid:  # a loader worker (forked with this handler): it keeps serving the batch the
            return  # main process is receiving (a cut handshake prints a traceback); the loader ends it after
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # workers may die first; torch's check would raise
        if self.training and not self.requested:
            self.requested = True
            return
        print(f"interrupted ({signal.Signals(signum).name}); exiting now; the last checkpoint in the output "
              "directory is kept; rerun the same command to resume", file=sys.stderr, flush=True)
        os._exit(1)

    def agreed(self, args):
        """Whether any rank was signalled (all ranks stop at the same iteration; one scalar all_reduce)."""
        if args.world_size == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def rng_states(args):
    """Every rank's torch random state (RPN/RoI sampling, the random short side), for an exact resume."""
    state = {"cpu": torch.get_rng_state()}
    if args.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(args.device)
    states = [state] * args.world_size
    if args.world_size > 1:
        dist.all_gather_object(states, {k: v.cpu() for k, v in state.items()})
    return states


def setup_distributed(args):
    args.world_size, args.rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if torch.cuda.is_available():
        args.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(args.device)
    else:
        args.device = torch.device("cpu")
    if args.world_size > 1:
        dist.init_process_group("nccl" if args.device.type == "cuda" else "gloo")
    if args.batch_size % args.world_size:
        raise SystemExit(f"error: --batch-size {args.batch_size} does not divide by the world size {args.world_size}")
    args.is_main = args.rank == 0
    args.amp = args.device.type == "cuda" if args.amp is None else args.amp
    args.channels_last = args.device.type == "cuda" if args.channels_last is None else args.channels_last
    args.lr_actual = args.lr * args.batch_size / 16


def make_logger(args):
    def log(record):
        if not args.is_main:
            return
        with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        short = {"loss_classifier": "cls", "loss_box_reg": "box", "loss_mask": "mask", "loss_objectness": "obj",
                 "loss_rpn_box_reg": "rpn"}  # log.jsonl has the full names
        terms = " ".join(f"{short.get(name, name)} {record[name]:.3f}" for name in record if name.startswith("loss_"))
        print(f"iter {record['iteration'] + 1}/{record['iters']} eta {record['eta_s'] / 60:.1f} min "
              f"lr {record['lr']:.5f} loss {record['loss']:.4f} ({terms}) {record['img_per_s']:.1f} img/s "
              f"data {100 * record['data_time'] / record['step_time']:.0f}%", flush=True)
    return log


def load_checkpoint(model, optimizer, args):
    """The iteration to start from: 0, or that of the checkpoint all ranks agree on (common.py)."""
    checkpoint = agreed_checkpoint("detect", args)
    if checkpoint is None:
        return 0, None
    path, saved = checkpoint_path(args), checkpoint["args"]
    if (saved.get("model"), saved.get("arch")) != (args.model, args.arch):
        stop(f"error: {path} is a detect {saved.get('model')} {saved.get('arch')} checkpoint, not {args.model} "
             f"{args.arch}; use another --output-dir, or --resume none to start over")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if args.is_main:  # progress lines count iterations done: the next one shown is iteration + 1
        print(f"resumed from {path}: {checkpoint['iteration']} of {args.iters} iterations done")
    states = checkpoint.get("rng")
    return checkpoint["iteration"], states[args.rank] if states and len(states) == args.world_size else None


def save_checkpoint(model, optimizer, iteration, args):
    """checkpoint.pth on the main process, atomically: a run's only file (rerun = resume). The final one (after
    PreciseBN) is the trained model, without the optimizer's momentum buffers (as large as the model)."""
    states = rng_states(args) if iteration < args.iters else None  # every rank takes part in the gather
    if not args.is_main:
        return
    optimizer_state = optimizer.state_dict()
    if iteration >= args.iters:
        optimizer_state["state"] = {}  # NOTE: a run extended with a larger --iters restarts momentum from zero
    state = {"method": "detect", "iteration": iteration, "model": model.state_dict(), "optimizer": optimizer_state,
             "rng": states,
             "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}}
    path = os.path.join(args.output_dir, "checkpoint.pth")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


# --- Main ---


def main(args):
    setup_distributed(args)
    source = read_weights(args.pretrained, "--pretrained")[0] if args.pretrained != "none" else None  # before data
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    train_set, test_set = open_dataset(args, train=True), open_dataset(args, train=False)
    model = build_model(args, train_set.num_classes)
    load_pretrained(model, args, source)
    model.to(args.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    if args.world_size > 1 and args.device.type == "cuda":  # NOTE: SyncBN needs CUDA: on CPU, BN stays per process
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.SGD(parameter_groups(model, args.wd), lr=args.lr_actual, momentum=0.9)
    start, rng = load_checkpoint(model, optimizer, args)
    if args.is_main:
        count = lambda module: sum(p.numel() for p in module.parameters()) / 1e6
        steps = [step for step in args.lr_steps if step < args.iters]  # the drops this run reaches
        print(f"world size {args.world_size}, device {args.device}, {args.model} {args.arch}, global batch "
              f"{args.batch_size}, lr {args.lr_actual:.4f} (= {args.lr} x {args.batch_size}/16)\n"
              f"{len(train_set)} train / {min(len(test_set), args.test_images or len(test_set))} test images, "
              f"backbone {count(model.backbone):.2f}M, rpn {count(model.rpn):.2f}M, "
              f"roi heads {count(model.roi_heads):.2f}M params\n"
              f"schedule: {args.iters} iterations, " + (f"lr x0.1 at {steps}" if steps else "no lr step") +
              f", warmup {min(args.warmup, args.iters)} (from {args.dataset}'s {SCHEDULES[args.dataset]['warmup']}), "
              f"precise BN {args.precise_bn_iters} batches")
    ddp_model = model if args.world_size == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[args.device] if args.device.type == "cuda" else None)
    interrupt = Interrupt()
    if not args.eval_only and start < args.iters:
        torch.manual_seed(args.seed + 1000 * args.rank)
        sampler = GroupedInfiniteSampler(train_set.aspect_groups(), args.batch_size // args.world_size, args.rank,
                                         args.world_size, args.seed, start)
        loader = torch.utils.data.DataLoader(DetectionTransform(train_set, True), batch_sampler=sampler,
                                             num_workers=args.workers, collate_fn=collate,
                                             pin_memory=args.device.type == "cuda")
        batches = iter(loader)  # endless: PreciseBN continues with the batches after training's
        if rng is not None:  # NOTE: the data order and flips come from the sampler; the rest of the randomness
            torch.set_rng_state(rng["cpu"])  # (RoI sampling, short sides) continues where the checkpoint left it,
            if "cuda" in rng and args.device.type == "cuda":  # so a resumed run trains the same weights
                torch.cuda.set_rng_state(rng["cuda"], args.device)
        interrupt.training = True
        train(model, ddp_model, batches, optimizer, start, args, make_logger(args), interrupt)
        interrupt.training = False
        precise_bn(model, batches, args)
        save_checkpoint(model, optimizer, args.iters, args)
    metrics = evaluate(model, test_set, args)
    if args.is_main:
        protocol = {k: v for k, v in vars(args).items()
                    if isinstance(v, (int, float, str, bool, list, type(None))) and k != "is_main"}
        sha256 = (hashlib.sha256(pathlib.Path(args.pretrained).read_bytes()).hexdigest()
                  if os.path.isfile(args.pretrained) else None)
        protocol.update(device=str(args.device), pretrained_sha256=sha256)
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump({**metrics, "protocol": protocol}, f, indent=1)
        print("metrics in percent (-1: no such objects; all in metrics.json):")
        for kind in ("bbox", "segm") if "segm" in metrics else ("bbox",):
            print(f"  {kind}: " + " ".join(f"{name} {value:.1f}" if value >= 0 else f"{name} -1"
                                           for name, value in metrics[kind].items()), flush=True)
    if args.world_size > 1:
        dist.destroy_process_group()
    return metrics


# --- Evaluators in numpy, number for number pycocotools' and detectron2's (docs/evaluators.md) ---
# COCO masks first: RLE (compressed strings, uncompressed counts) and polygons.


def rle_counts(mask):
    """Run lengths of a (H, W) mask in column-major order, starting with a run of zeros."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]]))
    return np.concatenate([[0], counts]) if flat.size and flat[0] else counts


def rle_encode(mask):
    """(H, W) mask -> compressed RLE {"size", "counts": str}, byte for byte maskApi.c's rleToString."""
    return {"size": [int(s) for s in np.shape(mask)], "counts": rle_counts_to_string(rle_counts(mask))}


def rle_counts_to_string(counts):
    """Run lengths -> maskApi.c's rleToString characters."""
    counts = np.asarray(counts, dtype=np.int64)
    x = counts.copy()
    x[3:] -= counts[1:-2]  # from the 4th on, a count is stored as the difference to the one two back
    # LEB128-like: 5 bits per char (low first), 0x20 = more chars follow, 0x10 of the last = sign, +48
    shifts = 5 * np.arange(7)
    chunks = (x[:, None] >> shifts) & 0x1F  # (m, 7)
    rest = x[:, None] >> (shifts + 5)
    more = np.where(chunks & 0x10, rest != -1, rest != 0)  # (m, 7)
    keep = np.arange(7) <= np.argmin(more, axis=1)[:, None]  # up to the first chunk without more
    chars = (chunks | (more.astype(np.int64) << 5)) + 48
    return chars[keep].astype(np.uint8).tobytes().decode()


def rle_string_to_counts(string):
    """Inverse of the string encoding above (maskApi.c's rleFrString)."""
    c = np.frombuffer(string.encode() if isinstance(string, str) else string, np.uint8).astype(np.int64) - 48
    last = (c & 0x20) == 0  # the last char of each value
    value = np.concatenate([[0], np.cumsum(last)[:-1]])  # which value each char belongs to
    first = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    k = np.arange(len(c)) - first[value]  # position of the char inside its value
    x = np.zeros(int(last.sum()), dtype=np.int64)
    np.bitwise_or.at(x, value, (c & 0x1F) << (5 * k))
    negative = last & ((c & 0x10) != 0)
    x[value[negative]] |= -1 << (5 * (k[negative] + 1))
    counts = x.copy()  # undo the differences: counts[i] = x[i] + counts[i - 2] for i > 2
    counts[1::2], counts[2::2] = np.cumsum(x[1::2]), np.cumsum(x[2::2])
    return counts


def polygon_rle_counts(polygon, height, width):
    """One polygon [x1, y1, x2, y2, ...] -> RLE counts, exactly as pycocotools' rleFrPoly (maskApi.c): a column
    toggles where the outline, walked on a 5x finer grid, crosses its centre (the algorithm: docs/evaluators.md)."""
    scale = 5
    xy = np.asarray(polygon, dtype=np.float64)[: len(polygon) // 2 * 2].reshape(-1, 2)  # (k, 2); an odd tail is dropped
    corner = np.trunc(scale * xy + 0.5).astype(np.int64)  # C's (int): truncation toward zero, not floor
    xs, ys = corner[:, 0], corner[:, 1]
    xe, ye = np.roll(xs, -1), np.roll(ys, -1)  # edge j goes from corner j to corner j + 1 (closed)
    dx, dy = np.abs(xe - xs), np.abs(ye - ys)
    along_x = dx >= dy  # step along the longer axis, from its smaller end, and read points back in order
    flip = np.where(along_x, xs > xe, ys > ye)
    xs, xe, ys, ye = np.where(flip, xe, xs), np.where(flip, xs, xe), np.where(flip, ye, ys), np.where(flip, ys, ye)
    steps = np.maximum(dx, dy)  # edge j has steps + 1 points, both corners included
    # slope along the walk; NOTE: 0 for a repeated corner (C gets 0/0 there; that point's y is never read)
    slope = np.divide(np.where(along_x, ye - ys, xe - xs), steps, out=np.zeros(len(steps)), where=steps > 0)
    edge = np.repeat(np.arange(len(steps)), steps + 1)  # (m,) every fine point's edge
    d = np.arange(len(edge)) - np.repeat(np.cumsum(steps + 1) - (steps + 1), steps + 1)
    t = np.where(flip[edge], steps[edge] - d, d)
    rounded = np.trunc(np.where(along_x, ys, xs)[edge] + slope[edge] * t + 0.5).astype(np.int64)  # same float ops as C
    u = np.where(along_x[edge], xs[edge] + t, rounded)  # (m,) fine x
    v = np.where(along_x[edge], rounded, ys[edge] + t)  # (m,) fine y
    j = np.flatnonzero(u[1:] != u[:-1]) + 1  # steps into another fine column
    column = (np.where(u[j] < u[j - 1], u[j], u[j] - 1) + 0.5) / scale - 0.5
    row = np.ceil(np.clip((np.minimum(v[j], v[j - 1]) + 0.5) / scale - 0.5, 0, height))
    crossing = (np.floor(column) == column) & (column >= 0) & (column <= width - 1)  # a pixel centre inside the image
    toggles = column[crossing].astype(np.int64) * height + row[crossing].astype(np.int64)  # column-major
    toggles = np.sort(np.append(toggles, height * width))
    runs = np.diff(toggles, prepend=0)
    # rleFrPoly's last loop: a zero run (two toggles at one place) is dropped and the run after it
    # joins the previous one; in a row of zeros they pair up, so an odd row merges the next run
    zero = (runs == 0) & (np.arange(len(runs)) > 0)
    index = np.arange(len(runs))
    last_kept = np.maximum.accumulate(np.where(zero, 0, index))  # the last non-zero run at or before each
    zeros_before = index - 1 - np.concatenate([[0], last_kept[:-1]])
    start = ~zero & ((zeros_before % 2 == 0) | (index == 0))
    return np.add.reduceat(runs, np.flatnonzero(start))


def mask_from_segmentation(segmentation, height, width):
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> (H, W) uint8, as pycocotools'
    annToMask: polygons rasterised by rleFrPoly (above), the parts of an object merged by union."""
    if isinstance(segmentation, list):
        mask = np.zeros((height, width), dtype=np.uint8)
        for polygon in segmentation:
            rle = {"size": [height, width], "counts": polygon_rle_counts(polygon, height, width)}
            mask |= mask_from_segmentation(rle, height, width)
        return mask
    counts = segmentation["counts"]
    if isinstance(counts, (str, bytes)):
        counts = rle_string_to_counts(counts)
    height, width = segmentation["size"]
    values = (np.arange(len(counts)) % 2).astype(np.uint8)
    return np.repeat(values, np.asarray(counts, dtype=np.int64)).reshape(width, height).T


def segmentation_area(segmentation, height, width):
    if isinstance(segmentation, dict):
        counts = segmentation["counts"]
        return int(np.sum((rle_string_to_counts(counts) if isinstance(counts, (str, bytes)) else counts)[1::2]))
    return int(mask_from_segmentation(segmentation, height, width).sum())


# --- COCO evaluation: pycocotools' COCOeval (bbox, segm), vectorised over pairs and thresholds ---

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # the same linspace calls as COCOeval's Params
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
AREA_RANGES = np.array([[0, 1e5 ** 2], [0, 32 ** 2], [32 ** 2, 96 ** 2], [96 ** 2, 1e5 ** 2]])  # all, S, M, L
MAX_DETECTIONS = (1, 10, 100)
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _rank_in_group(sorted_keys):
    """0, 1, 2, ... inside each run of equal keys."""
    n = len(sorted_keys)
    starts = np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]])
    return np.arange(n) - np.maximum.accumulate(np.where(starts, np.arange(n), 0))


def _coco_flatten(gt, results, iou_type):
    """Ground truth and detections as flat arrays sorted the way COCOeval._prepare/evaluateImg see them."""
    image_ids = sorted({image["id"] for image in gt["images"]})
    category_ids = sorted({category["id"] for category in gt["categories"]})
    image_index, category_index = {i: n for n, i in enumerate(image_ids)}, {c: n for n, c in enumerate(category_ids)}
    sizes = {image["id"]: (image["height"], image["width"]) for image in gt["images"]}
    if not set(r["image_id"] for r in results) <= set(image_index):
        raise ValueError("results refer to images that are not in the ground truth")
    annotations = [a for a in gt["annotations"] if a["image_id"] in image_index and a["category_id"] in category_index]
    results = [r for r in results if r["category_id"] in category_index]
    # COCO.loadRes: a bbox in the first result means areas are box areas (even for segm)
    use_box_area = bool(results) and bool(results[0].get("bbox"))
    K = len(category_ids)
    out = {"K": K, "sizes": sizes}
    for name, items in (("gt", annotations), ("det", results)):
        image = np.array([image_index[i["image_id"]] for i in items], dtype=np.int64)
        category = np.array([category_index[i["category_id"]] for i in items], dtype=np.int64)
        if name == "gt":
            score = np.zeros(len(items))
            area = np.array([float(i["area"]) for i in items])
            crowd = np.array([bool(i.get("iscrowd", 0)) for i in items], dtype=bool)
        else:
            score = np.array([float(i["score"]) for i in items])
            area = np.array([i["bbox"][2] * i["bbox"][3] if use_box_area else
                             segmentation_area(i["segmentation"], *sizes[i["image_id"]]) for i in items], dtype=float)
            crowd = np.zeros(len(items), dtype=bool)
        order = np.lexsort((np.arange(len(items)), -score, category, image))  # stable score sort per pair
        key = (image * K + category)[order]
        keep = _rank_in_group(key) < MAX_DETECTIONS[-1] if name == "det" else np.ones(len(items), bool)
        order, key = order[keep], key[keep]
        out[name] = {"key": key, "rank": _rank_in_group(key), "score": score[order], "area": area[order],
                     "crowd": crowd[order], "image": image[order], "category": category[order],
                     "items": [items[i] for i in order]}
        if iou_type == "bbox":
            out[name]["box"] = np.array([i["bbox"] for i in out[name]["items"]], dtype=float).reshape(-1, 4)
    return out


def _box_iou_xywh(d, g, crowd):
    """pycocotools' bbIou, same operation order. d (P, D, 4), g (P, G, 4) xywh, crowd (P, G) -> (P, D, G)."""
    dx, dy, dw, dh = (d[:, :, i, None] for i in range(4))
    gx, gy, gw, gh = (g[:, None, :, i] for i in range(4))
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    inter, det_area = w * h, dw * dh
    union = np.where(crowd[:, None, :], det_area, det_area + gw * gh - inter)  # crowd: IoU = inter / det area
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w > 0) & (h > 0), inter / union, 0.0)


def _mask_iou(det_masks, gt_masks, crowd):
    """(D, H, W), (G, H, W) bool -> (D, G); each gt's intersection is counted inside its bounding box."""
    inter = np.zeros((len(det_masks), len(gt_masks)))
    for j, g in enumerate(gt_masks):
        rows, cols = np.flatnonzero(g.any(1)), np.flatnonzero(g.any(0))
        if len(rows):
            box = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            inter[:, j] = np.count_nonzero(det_masks[box] & g[box[1:]], axis=(1, 2))
    det_area, gt_area = det_masks.sum((1, 2))[:, None], gt_masks.sum((1, 2))[None, :]
    union = np.where(crowd[None, :], det_area, det_area + gt_area - inter)
    return np.where(inter > 0, inter / np.maximum(union, 1), 0.0)


def _coco_match(iou, gt_ignore, crowd):
    """COCOeval.evaluateImg's greedy matching of P (image, category) pairs at once: iou (P, D, G), -1 = padding,
    gt_ignore (P, A, G), crowd (P, G) -> matched, matched_to_ignored (P, A, T, D). Each detection, best score first,
    takes the highest-IoU free (or crowd) gt >= the threshold, non-ignored first, ties to the last (COCOeval's `<`)."""
    P, D, G = iou.shape
    thresholds = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[None, None, :, None]  # (1, 1, T, 1)
    taken = np.zeros((P, len(AREA_RANGES), len(IOU_THRESHOLDS), G), dtype=bool)  # (P, A, T, G)
    matched = np.zeros(taken.shape[:3] + (D,), dtype=bool)
    matched_ignored = np.zeros_like(matched)
    for d in range(D):
        current = iou[:, None, None, d, :]  # (P, 1, 1, G)
        candidate = (current >= thresholds) & (~taken | crowd[:, None, None, :])
        regular = candidate & ~gt_ignore[:, :, None, :]
        use = np.where(regular.any(-1, keepdims=True), regular, candidate)
        best = G - 1 - np.argmax(np.where(use, current, -np.inf)[..., ::-1], axis=-1)  # (P, A, T)
        hit = (np.arange(G) == best[..., None]) & use.any(-1, keepdims=True)
        taken |= hit
        matched[..., d] = hit.any(-1)
        matched_ignored[..., d] = (hit & gt_ignore[:, :, None, :]).any(-1)
    return matched, matched_ignored


def _coco_match_all(flat, iou_type, budget=2_000_000):
    """Match every (image, category) pair that has both detections and gts, in chunks of similar size."""
    gt, det = flat["gt"], flat["det"]
    n_det = len(det["key"])
    out_of_range = lambda area: (area[:, None] < AREA_RANGES[:, 0]) | (area[:, None] > AREA_RANGES[:, 1])  # (n, A)
    gt_ignore = gt["crowd"][:, None] | out_of_range(gt["area"])
    matched = np.zeros((n_det, len(AREA_RANGES), len(IOU_THRESHOLDS)), dtype=bool)
    ignored = np.zeros_like(matched)
    pairs = np.intersect1d(det["key"], gt["key"])
    det_start, gt_start = np.searchsorted(det["key"], pairs), np.searchsorted(gt["key"], pairs)
    det_count = np.searchsorted(det["key"], pairs, "right") - det_start
    gt_count = np.searchsorted(gt["key"], pairs, "right") - gt_start
    order = np.lexsort((det_count, gt_count))
    masks = {}
    decode = lambda item: masks.setdefault(id(item), mask_from_segmentation(
        item["segmentation"], *flat["sizes"][item["image_id"]]).astype(bool))
    begin = 0
    while begin < len(order):  # sorted by size, so padding to the chunk's largest pair wastes little
        end, D, G = begin, 0, 0
        while end < len(order):
            D_next, G_next = max(D, det_count[order[end]]), max(G, gt_count[order[end]])
            if end > begin and (end - begin + 1) * D_next * G_next * 40 > budget:
                break
            D, G, end = D_next, G_next, end + 1
        chunk = order[begin:end]
        P = len(chunk)
        det_index = np.full((P, D), -1)  # (P, D) rows of the flat arrays, -1 = padding
        gt_index = np.full((P, G), -1)
        for row, p in enumerate(chunk):
            det_index[row, :det_count[p]] = np.arange(det_start[p], det_start[p] + det_count[p])
            gt_index[row, :gt_count[p]] = np.arange(gt_start[p], gt_start[p] + gt_count[p])
        crowd = gt["crowd"][gt_index] & (gt_index >= 0)
        if iou_type == "bbox":
            iou = _box_iou_xywh(det["box"][det_index], gt["box"][gt_index], crowd)
        else:
            iou = np.zeros((P, D, G))
            for row, p in enumerate(chunk):
                d_masks = np.stack([decode(det["items"][i]) for i in det_index[row, :det_count[p]]])
                g_masks = np.stack([decode(gt["items"][i]) for i in gt_index[row, :gt_count[p]]])
                iou[row, :det_count[p], :gt_count[p]] = _mask_iou(d_masks, g_masks, crowd[row, :gt_count[p]])
        iou[(det_index[:, :, None] < 0) | (gt_index[:, None, :] < 0)] = -1
        m, i = _coco_match(iou, np.moveaxis(gt_ignore[gt_index], 1, 2), crowd)  # (P, A, T, D)
        valid = det_index >= 0
        matched[det_index[valid]] = np.moveaxis(m, 3, 1)[valid]
        ignored[det_index[valid]] = np.moveaxis(i, 3, 1)[valid]
        begin = end
    # unmatched detections outside an area range are ignored for that range
    ignored |= ~matched & out_of_range(det["area"])[:, :, None]
    return matched, ignored, gt_ignore


def _coco_accumulate(flat, matched, ignored, gt_ignore):
    """COCOeval.accumulate: precision (T, R, K, A, M) and recall (T, K, A, M), -1 where undefined."""
    T, R, K, A, M = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), flat["K"], len(AREA_RANGES), len(MAX_DETECTIONS)
    precision, recall = -np.ones((T, R, K, A, M)), -np.ones((T, K, A, M))
    det = flat["det"]
    order = np.lexsort((det["rank"], det["image"], -det["score"], det["category"]))
    bounds = np.searchsorted(det["category"][order], np.arange(K + 1))
    tp_all, fp_all = (matched & ~ignored)[order], (~matched & ~ignored)[order]  # (n, A, T), per category by score
    rank = det["rank"][order]
    regular_gts = np.stack([np.bincount(flat["gt"]["category"][~gt_ignore[:, a]], minlength=K) for a in range(A)], 1)
    for k in range(K):
        block = slice(bounds[k], bounds[k + 1])
        for m, max_det in enumerate(MAX_DETECTIONS):
            keep = rank[block] < max_det
            tp = np.cumsum(tp_all[block][keep], axis=0, dtype=float)  # (n, A, T)
            fp = np.cumsum(fp_all[block][keep], axis=0, dtype=float)
            n = len(tp)
            for a in range(A):
                if regular_gts[k, a] == 0:
                    continue
                rc = tp[:, a] / regular_gts[k, a]  # (n, T)
                pr = np.maximum.accumulate((tp[:, a] / (fp[:, a] + tp[:, a] + np.spacing(1)))[::-1], axis=0)[::-1]
                recall[:, k, a, m] = rc[-1] if n else 0
                for t in range(T):
                    inds = np.searchsorted(rc[:, t], RECALL_THRESHOLDS, side="left")
                    precision[t, :, k, a, m] = np.where(inds < n, pr[np.minimum(inds, n - 1), t] if n else 0, 0)
    return precision, recall


def coco_summarize(precision, recall):
    """COCOeval.summarize's 12 numbers (fractions, -1 where nothing is defined)."""
    mean = lambda s: float(np.mean(s[s > -1])) if (s > -1).any() else -1.0
    t50, t75 = np.flatnonzero(IOU_THRESHOLDS == 0.5), np.flatnonzero(IOU_THRESHOLDS == 0.75)
    return [mean(precision[:, :, :, 0, 2]), mean(precision[t50][:, :, :, 0, 2]), mean(precision[t75][:, :, :, 0, 2]),
            mean(precision[:, :, :, 1, 2]), mean(precision[:, :, :, 2, 2]), mean(precision[:, :, :, 3, 2]),
            mean(recall[:, :, 0, 0]), mean(recall[:, :, 0, 1]), mean(recall[:, :, 0, 2]),
            mean(recall[:, :, 1, 2]), mean(recall[:, :, 2, 2]), mean(recall[:, :, 3, 2])]


def coco_evaluate(gt, results, iou_type="bbox"):
    """COCO json dict + results list -> {"stats": 12 numbers as COCOeval.stats, "precision", "recall"}."""
    flat = _coco_flatten(gt, results, iou_type)
    precision, recall = _coco_accumulate(flat, *_coco_match_all(flat, iou_type))
    return {"stats": coco_summarize(precision, recall), "precision": precision, "recall": recall}


# --- VOC evaluation: detectron2's PascalVOCDetectionEvaluator (VOC2007 11-point AP, IoU .50:.95) ---

VOC_THRESHOLDS = np.arange(50, 100, 5) / 100


def voc_ap_11_point(recall, precision):
    """VOC2007 metric: mean over r in 0, 0.1, ..., 1 of the best precision at recall >= r."""
    return sum((precision[recall >= t].max() if (recall >= t).any() else 0) / 11.0 for t in np.arange(0.0, 1.1, 0.1))


def _voc_best_overlaps(gt, det):
    """Each detection's best-overlapping gt of its own class (difficult ones too), VOC +1 areas."""
    g, d = np.asarray(gt["boxes"], float).reshape(-1, 4), np.asarray(det["boxes"], float).reshape(-1, 4)
    ixmin, iymin = np.maximum(g[None, :, 0], d[:, None, 0]), np.maximum(g[None, :, 1], d[:, None, 1])
    ixmax, iymax = np.minimum(g[None, :, 2], d[:, None, 2]), np.minimum(g[None, :, 3], d[:, None, 3])
    inters = np.maximum(ixmax - ixmin + 1.0, 0.0) * np.maximum(iymax - iymin + 1.0, 0.0)  # (D, G)
    union = ((d[:, None, 2] - d[:, None, 0] + 1.0) * (d[:, None, 3] - d[:, None, 1] + 1.0)
             + (g[None, :, 2] - g[None, :, 0] + 1.0) * (g[None, :, 3] - g[None, :, 1] + 1.0) - inters)
    overlaps = np.where(np.asarray(det["labels"])[:, None] == np.asarray(gt["labels"]), inters / union, -np.inf)
    if overlaps.shape[1] == 0:
        return np.full(len(d), -np.inf), np.zeros(len(d), dtype=np.int64)
    return overlaps.max(1), overlaps.argmax(1)  # argmax: the first of equal overlaps, as voc_eval


def voc_evaluate(ground_truth, detections, num_classes):
    """Per image gt {"boxes" (n, 4), "labels" (n,) in 1..C, "difficult" (n,)} and detections {"boxes", "scores",
    "labels"} in VOC pixels -> percent AP (IoU .50:.95), AP50, AP75, per-class APs, as detectron2 (mean over classes,
    then thresholds). NOTE: a stable sort (voc_eval's np.argsort is not); classes with no non-difficult gt are out."""
    labels, scores, ovmax, gt_key, difficult = [], [], [], [], []
    positives, offset = np.zeros(num_classes + 1, dtype=np.int64), 0
    for gt, det in zip(ground_truth, detections):
        gt_difficult = np.asarray(gt["difficult"], bool).reshape(-1)
        positives += np.bincount(np.asarray(gt["labels"], np.int64)[~gt_difficult], minlength=num_classes + 1)
        best, index = _voc_best_overlaps(gt, det)
        labels.append(np.asarray(det["labels"], np.int64).reshape(-1))
        scores.append(np.asarray(det["scores"], float).reshape(-1))
        ovmax.append(best)
        gt_key.append(index + offset)  # a global gt number, so duplicates are found across images
        difficult.append(gt_difficult[index] if len(gt_difficult) else np.zeros(len(index), bool))
        offset += len(gt_difficult)
    labels, scores, ovmax, gt_key, difficult = map(np.concatenate, (labels, scores, ovmax, gt_key, difficult))
    per_class = {}
    for c in range(1, num_classes + 1):
        if positives[c] == 0:
            continue
        rows = np.flatnonzero(labels == c)
        rows = rows[np.argsort(-scores[rows], kind="stable")]
        per_class[c] = []
        for t in VOC_THRESHOLDS:
            hit = ovmax[rows] > t
            counted = np.flatnonzero(hit & ~difficult[rows])  # hits on difficult gts count as nothing
            tp = np.zeros(len(rows))
            tp[counted[np.unique(gt_key[rows][counted], return_index=True)[1]]] = 1  # first detection of each gt
            fp = (~hit | (hit & ~difficult[rows])) & (tp == 0)
            tp, fp = np.cumsum(tp), np.cumsum(fp)
            precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
            per_class[c].append(100 * voc_ap_11_point(tp / float(positives[c]), precision))
    ap = np.mean(list(per_class.values()), axis=0) if per_class else np.zeros(len(VOC_THRESHOLDS))  # (T,)
    return {"AP": float(ap.mean()), "AP50": float(ap[0]), "AP75": float(ap[5]),  # per class: {50: AP50, ..., 95: AP95}
            "per_class": {c: dict(zip(range(50, 100, 5), v)) for c, v in per_class.items()}}


if __name__ == "__main__":
    main(get_args())
