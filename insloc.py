"""InsLoc: Instance Localization for Self-supervised Detection Pretraining.

Yang, Wu, Zhou, Lin, CVPR 2021, arXiv:2102.08318 (sections 3-4 and 5).
The authors released the R50-FPN pretraining; every reading of the paper or the release is a NOTE at its code.

Idea (sec. 4.1): paste a random crop of the foreground image at a random place and scale onto another
image of the dataset, pool the features of its bounding box with RoIAlign, and contrast the RoI embeddings
of the same instance pasted on two DIFFERENT backgrounds (MoCo). The pooled features must then describe
what is inside the box, not its surroundings, which aligns features with boxes as a detector needs.
Sec. 4.2: the query pools a jittered box, a random anchor overlapping the true box. Sec. 4.3: the RoI head
is the detector's (R50-C4: res5 on RoIAlign of res4; R50-FPN: FPN + a 4conv1fc head on every level).

    python insloc.py --tiny                                  # toy world, CPU, R18-C4, 1,248 steps
    python insloc.py --tiny --variant fpn                    # R18-FPN, heads at 0.01x the lr
    torchrun --nproc_per_node=8 insloc.py --data /imagenet --variant c4
    torchrun --nproc_per_node=8 insloc.py --data /imagenet --variant fpn --output-dir runs/insloc_fpn
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 \\
        --nproc_per_node=8 insloc.py --data /imagenet --variant fpn
    python -m tools.readout runs/insloc/backbone.pth B/backbone.pth   # Table 3a readouts of frozen backbones

Recipe (defaults): canvas 256, foreground fitted into w x h drawn in [128, 255), aspect ratios
(1/3, 3) for C4 and (1/2, 2) for FPN (footnote 3); tau 0.2, K 65536, m 0.999, SGD lr 0.03
per 256 with Nesterov momentum 0.9, wd 1e-4, cosine, 200 epochs, 32 images per GPU x 8.
Expected (paper, 200 epochs): VOC07+12 Faster R-CNN R50-C4 AP 57.9 (MoCo v2 57.0, Table 1);
COCO Mask R-CNN 2x AP^bb 41.4 (R50-C4) and 43.2 (R50-FPN) (Table 2).
"""
import argparse
import copy
import inspect
import json
import math
import os
import random
import resource
import signal
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

from common import (IMAGENET_MEAN, IMAGENET_STD, MomentumQueue, ResNetTrunk, UnreadableImages, add_knn_arguments,
                    agreed_checkpoint, batchnorm_groups, bench_loader, check_args, check_unreadable, collapse_signals,
                    collapse_warning, convert_to_ghost_batchnorm, draw_colour, ema_update, font, knn_monitor,
                    open_source, photometric, plot_log, raise_interrupt, resume_epoch, roi_align_boxes,
                    shuffled_key_forward, stop_interrupted, world_size)

# --- Arguments ---

# NOTE: --tiny is dilo.py's tiny recipe (8 epochs of 5,000 toy images, K 96, 1,248 steps, the paper's lr and m), in
# which C4's loss falls as MoCo v2's does (300 steps do not move it). With the paper's lr on every layer FPN's does
# not fall: the layers on the trunk (FPN, box head, projection) make its query embeddings collapse in the first steps.
# The authors' recipe collapses too: with the release's init, adaptive RoIAlign sampling and key BN chunks of 32, at
# batch 256 / lr 0.03 / K 65536, one SGD step takes the mean query cosine to 1.000 (C4: 0.96), and the authors' issue
# tracker (limbo0000/InstanceLoc #19) reports about 100k unstable steps with the loss near 40 = 4 ln 65537.
# --tiny --variant fpn trains those layers at 0.01x the lr (--head-lr-scale, a tiny-only aid; the trunk keeps the
# paper's lr); the full recipe keeps 1 (docs/insloc_fpn_collapse.md). `--tiny --epochs 1 --steps 10` is a 10-step
# smoke run.
METHOD = "insloc"  # the name its checkpoints carry
TINY = dict(data="synthetic", arch="resnet18", image_size=64, batch_size=32, queue_size=96, bn_batch=8,
            epochs=8, workers=2, print_freq=20)
TINY_IMAGES = 5000


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="InsLoc pretraining",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="synthetic", help="image folder (ImageNet layout aware) or 'synthetic'")
    parser.add_argument("--arch", default="resnet50", help="torchvision ResNet: resnet18/34/50/101/152")
    parser.add_argument("--epochs", type=int, default=200, help="epochs; the cosine lr schedule spans them")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch over all processes")
    parser.add_argument("--lr", type=float, default=0.03, help="base lr per 256 images (scaled linearly)")
    parser.add_argument("--wd", type=float, default=1e-4, help="weight decay")
    parser.add_argument("--workers", type=int, default=8, help="data loader workers per process")
    parser.add_argument("--image-size", type=int, default=256, help="canvas size, pixels")
    parser.add_argument("--queue-size", type=int, default=65536, help="K, keys in the queue")
    parser.add_argument("--temperature", type=float, default=0.2, help="tau of InfoNCE")
    parser.add_argument("--ema", type=float, default=0.999, help="m, key encoder momentum")
    parser.add_argument("--bn-batch", type=int, default=32,
                        help="samples per BatchNorm group, both encoders (per-GPU batch of the paper)")
    parser.add_argument("--output-dir", default="runs/insloc", help="checkpoint.pth, backbone.pth, log.jsonl, loss.png")
    parser.add_argument("--resume", default="auto",
                        help="'auto' (output-dir/checkpoint.pth if present), a path, or 'none'")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast; None: on for CUDA, off on CPU")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="NHWC memory format for images and weights; None: on for CUDA, off on CPU")
    parser.add_argument("--print-freq", type=int, default=10, help="iterations between log lines")
    parser.add_argument("--seed", type=int, default=0, help="seeds weights, queues and data order")
    parser.add_argument("--steps", type=int, default=0, help="cap on iterations per epoch (0 = full epoch)")
    parser.add_argument("--tiny", action="store_true", help=f"CPU-sized recipe: {TINY_IMAGES} toy images, "
                        + " ".join(f"{k}={v}" for k, v in TINY.items()))
    parser.add_argument("--preview", type=int, default=0, help="write output-dir/preview.png with N samples, then exit")
    parser.add_argument("--bench-loader", type=int, default=0, metavar="N",
                        help="time N loader items on one CPU thread, then exit")
    add_knn_arguments(parser)  # --knn-every, --knn-data, --knn-images: the k-NN monitor (common.py)
    # InsLoc (sec. 4.1-4.3)
    parser.add_argument("--variant", default="c4", choices=["c4", "fpn"],
                        help="detector the pretraining mimics (sec. 4.3)")
    parser.add_argument("--box-aug", action=argparse.BooleanOptionalAction, default=True,
                        help="query pools a random anchor with IoU > 0.5 (sec. 4.2)")
    parser.add_argument("--fg-ratio", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="foreground aspect ratio range w/h; None: 1/3 3 for c4, 1/2 2 for fpn (footnote 3)")
    parser.add_argument("--head-lr-scale", type=float, default=None,
                        help="lr multiplier of the layers on the trunk (c4: MLP; fpn: FPN, box head, projection); "
                             "None: 1 (the paper), 0.01 for --tiny --variant fpn")
    args = parser.parse_args(argv)
    if args.tiny:  # the tiny recipe replaces defaults only: explicit flags still win
        parser.set_defaults(**TINY)
        args = parser.parse_args(argv)
    if args.fg_ratio is None:
        args.fg_ratio = [1 / 3, 3.0] if args.variant == "c4" else [1 / 2, 2.0]
    if args.head_lr_scale is None:  # NOTE above TINY: FPN's head collapses at tiny with the paper's lr
        args.head_lr_scale = 0.01 if args.tiny and args.variant == "fpn" else 1.0
    check_args(parser, args)
    if not 0 < args.fg_ratio[0] <= args.fg_ratio[1]:
        parser.error(f"--fg-ratio {args.fg_ratio[0]} {args.fg_ratio[1]}: need 0 < MIN <= MAX")
    if args.head_lr_scale < 0:
        parser.error(f"--head-lr-scale {args.head_lr_scale}: must be >= 0")
    return args


# --- Data: composition (sec. 4.1), bounding-box augmentation (sec. 4.2), MoCo v2 colour ---


def pixel_sizes(image_size):
    """NOTE: the paper's pixel sizes for a 256 canvas scale with `image_size` / 256 (the one place they live)."""
    s = image_size / 256
    return {"foreground": (round(128 * s), round(255 * s)),  # fitting box sides drawn in [lo, hi)
            "anchor_stride": 16 * s, "anchor_sizes": [32 * s, 64 * s, 128 * s, 256 * s]}


# NOTE: anchors (sec. 4.2) sit at the centres of a 16 x 16 grid, (16i + 8, 16j + 8), and are clipped to the canvas;
# the IoU is taken with the clipped anchors. The release centres them at (16i, 16j) and does not clip them. We keep
# ours: the grid is symmetric under the flip and the query never pools padding (with the release's anchors about a
# third of the picked boxes cross the canvas edge), at the same mean IoU of the picked box (docs/fidelity.md).
def make_anchors(image_size, aspect_ratios=(0.5, 0.75, 1.0, 1.5, 2.0)):
    """RPN-style anchors (sec. 4.2): 16 x 16 positions x 4 sizes x 5 ratios (h/w), clipped -> (5120, 4)."""
    sizes = pixel_sizes(image_size)
    stride, scale = sizes["anchor_stride"], torch.tensor(sizes["anchor_sizes"])
    ratio = torch.tensor(aspect_ratios).sqrt()
    w, h = (scale[:, None] / ratio).flatten(), (scale[:, None] * ratio).flatten()  # (20,) same area per size
    centres = (torch.arange(round(image_size / stride)) + 0.5) * stride  # (16,)
    cy, cx = (c.reshape(-1, 1) for c in torch.meshgrid(centres, centres, indexing="ij"))  # (256, 1)
    anchors = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)  # (256, 20, 4)
    return anchors.reshape(-1, 4).clamp(0, image_size)


# NOTE: if no anchor has IoU > 0.5, the best one is used; the release falls back to the top 4,000 anchors
# by IoU. The release spreads the choice: NMS 0.7 over random scores thins the candidates, then one of the
# survivors is drawn uniformly; so do we, per sample in the data loader workers.
def augment_box(box, anchors, iou_threshold=0.5, nms_threshold=0.7):
    """A random anchor with IoU > 0.5 with `box` (4,), or the best anchor if none (sec. 4.2)."""
    iou = torchvision.ops.box_iou(box[None], anchors)[0]  # (A,)
    candidates = anchors[iou > iou_threshold] if (iou > iou_threshold).any() else anchors[iou.argmax()][None]
    kept = torchvision.ops.nms(candidates, torch.rand(len(candidates)), nms_threshold)
    return candidates[kept[torch.randint(len(kept), ())]]


def fit_foreground(width, height, lo, hi):
    """The release's foreground scale (mmcv.imrescale into a random (w, h), w, h in [lo, hi)): the crop
    keeps its aspect ratio and fits inside the box whichever its orientation, its longer side within
    the longer draw and its shorter side within the shorter. -> (width, height) in canvas pixels."""
    fit = torch.randint(lo, hi, (2,))
    scale = min(float(fit.max()) / max(width, height), float(fit.min()) / min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


class InstanceComposition(torch.utils.data.Dataset):
    """Item i -> (im_q, im_k, box_q, box_q_aug, box_k, colour): image i pasted on two other images.
    Composites are (3, S, S) uint8, colour (2, 12) their photometric parameters; boxes are (4,) xyxy
    canvas pixels; box_q_aug is the query's augmented box (= box_q with --no-box-aug). An epoch
    visits every image once as the foreground."""

    def __init__(self, source, args):
        if len(source) < 3:
            raise SystemExit(f"error: InsLoc needs at least 3 images (a foreground, two backgrounds), "
                             f"got {len(source)}")
        self.source, self.args, self.size = source, args, args.image_size
        self.foreground_side = pixel_sizes(args.image_size)["foreground"]
        self.anchors = make_anchors(args.image_size)  # (A, 4), shared by every sample

    def __len__(self):
        return len(self.source)

    # NOTE: the background is the whole other image stretched to the canvas (spec).
    def load_background(self, index):
        return TF.resize(TF.pil_to_tensor(self.source[index][0]), [self.size, self.size], antialias=True)  # (3, S, S)

    def draw_backgrounds(self, index):
        """NOTE: two distinct background indices (the views' differ), neither the foreground `index` (footnote 2)."""
        chosen = []
        while len(chosen) < 2:
            b = int(torch.randint(len(self.source), ()))
            if b != index and b not in chosen:
                chosen.append(b)
        return chosen

    def compose(self, image, background_index):
        """C(I, B) of eq. 3-4: a random crop of `image` (3, H, W) uint8 hard-pasted on background B -> one view."""
        S = self.size
        i, j, h, w = T.RandomResizedCrop.get_params(image, scale=(0.2, 1.0), ratio=self.args.fg_ratio)
        size = fit_foreground(w, h, *self.foreground_side)  # (width, height)
        crop = TF.resized_crop(image, i, j, h, w, [size[1], size[0]], antialias=True)  # crop, then resize
        x, y = int(torch.randint(S - size[0] + 1, ())), int(torch.randint(S - size[1] + 1, ()))
        composite = self.load_background(background_index)
        composite[:, y:y + size[1], x:x + size[0]] = crop  # hard paste, no blending
        box = torch.tensor([x, y, x + size[0], y + size[1]], dtype=torch.float32)
        # NOTE: the composite is flipped before the colour augmentation (the spec lists the flip after); every
        # colour operation is per pixel or mirror-symmetric, so the distribution is the same and sample() returns
        # the final geometry. The colour part runs on the training device, one draw per composite (photometric).
        flipped = bool(torch.rand(()) < 0.5)
        if flipped:  # the box is mirrored with the canvas
            composite = TF.hflip(composite)
            box = torch.stack([S - box[2], box[1], S - box[0], box[3]])
        return {"composite": composite, "box": box, "background": background_index, "crop": crop, "flipped": flipped}

    def sample(self, index):
        """-> foreground image (PIL), [view_q, view_k] (dicts from compose(), before colour augmentation)."""
        image = self.source[index][0]
        pixels = TF.pil_to_tensor(image)  # (3, H, W) uint8, decoded once for both views
        return image, [self.compose(pixels, b) for b in self.draw_backgrounds(index)]

    def __getitem__(self, index):
        _, (view_q, view_k) = self.sample(index)
        box_q = view_q["box"]
        # The query's augmented box: C4 pools it; FPN on P5 only (NOTE in InsLoc.forward). The key: the true box.
        box_q_aug = augment_box(box_q, self.anchors) if self.args.box_aug else box_q
        return view_q["composite"], view_k["composite"], box_q, box_q_aug, view_k["box"], draw_colour(2)


# --- Model: encoders pool one box per FPN level (C4: one level), key encoder, one queue per level ---


def init_head(fcs, last):
    """NOTE: head init as the release (ConvFCBBoxInsClsHead.init_weights): the hidden fcs (C4: the MLP's
    first Linear; FPN: fc6, fc7) Xavier-uniform, the last Linear N(0, 0.01), biases 0; FPN convs
    Xavier-uniform (EncoderFPN). The release has no C4 config; its RoI head takes a res5 shared head
    before the same head class, so C4's MLP gets the same init."""
    for fc in fcs:
        nn.init.xavier_uniform_(fc.weight)
        nn.init.zeros_(fc.bias)
    nn.init.normal_(last.weight, 0, 0.01)
    nn.init.zeros_(last.bias)


# NOTE: RoIAlign (both encoders) samples each bin adaptively (ceil(bin side / feature cell) points a
# side, sampling_ratio=0), as the release (sample_num=0). At a 256 canvas a box side of 128-256 px spans
# 32-64 P2 cells, so a 7 x 7 bin is 4.6-9.1 cells wide (P3: 2.3-4.6), which fixed 2 x 2 points would alias.
class EncoderC4(nn.Module):
    """R50-C4 (sec. 4.3): RoIAlign 14 x 14 on res4 -> res5 -> average pool -> MLP -> 128."""

    levels = ["c4"]

    def __init__(self, arch, dim=128):
        super().__init__()
        self.backbone = ResNetTrunk(arch)
        C = self.backbone.channels[-1]
        self.head = nn.Sequential(nn.Linear(C, C), nn.ReLU(inplace=True), nn.Linear(C, dim))
        init_head([self.head[0]], self.head[2])

    def forward(self, x, boxes):
        """x (N, 3, S, S), boxes (N, 1, 4) canvas pixels -> (N, 1, 128)."""
        c4 = self.backbone.forward_to_res4(x)  # (N, C/2, S/16, S/16)
        roi = roi_align_boxes(c4, boxes[:, 0], 14, self.backbone.strides[2], sampling_ratio=0)  # (N, C/2, 14, 14)
        r5 = self.backbone.layer4(roi)  # (N, C, 7, 7): res5 is the RoI head, as in the C4 detector
        return F.normalize(self.head(r5.mean(dim=(2, 3))), dim=1)[:, None]  # (N, 1, 128)

    def torchvision_state_dict(self):
        return self.backbone.state_dict()


class EncoderFPN(nn.Module):
    """R50-FPN (sec. 4.3): RoIAlign 7 x 7 on each of P2..P5 -> shared 4conv1fc head -> MLP -> 128."""

    levels = ["p2", "p3", "p4", "p5"]

    def __init__(self, arch, dim=128):
        super().__init__()
        self.backbone = ResNetTrunk(arch)
        # Built exactly as detect_finetune.py builds them, so backbone.pth loads there.
        self.fpn = torchvision.ops.FeaturePyramidNetwork(self.backbone.channels, 256, norm_layer=nn.BatchNorm2d)
        self.box_head = FastRCNNConvFCHead((256, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d)
        self.projection = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(inplace=True), nn.Linear(1024, dim))
        for conv in self.fpn.modules():  # the release's FPN.init_weights (the head convs: torchvision's = mmcv's)
            if isinstance(conv, nn.Conv2d):
                nn.init.xavier_uniform_(conv.weight)
        init_head([self.box_head[-2], self.projection[0]], self.projection[2])  # fc6, fc7; fc_cls

    def forward(self, x, boxes):
        """x (N, 3, S, S), boxes (N, 4, 4): one box per level P2..P5 -> (N, 4, 128)."""
        pyramid = self.fpn(OrderedDict(zip(self.levels, self.backbone(x))))  # P2..P5, (N, 256, S/4, S/4) ...
        rois = [roi_align_boxes(p, boxes[:, l], 7, stride, sampling_ratio=0)  # each (N, 256, 7, 7), no level assignment
                for l, (p, stride) in enumerate(zip(pyramid.values(), self.backbone.strides))]
        # NOTE: the shared head runs on the RoIs of all four levels as one batch (its BN sees them together,
        # as a detector's box head does): (4N, 128), level-major, row l * N + i is image i's RoI (ghost BN group i % G)
        z = self.projection(self.box_head(torch.cat(rois)))
        return F.normalize(z, dim=1).reshape(len(rois), len(x), -1).transpose(0, 1)  # (N, 4, 128)

    def torchvision_state_dict(self):
        """Trunk keys + fpn.* (FeaturePyramidNetwork) + box_head.* (FastRCNNConvFCHead)."""
        state = self.backbone.state_dict()
        state.update({f"fpn.{k}": v for k, v in self.fpn.state_dict().items()})
        state.update({f"box_head.{k}": v for k, v in self.box_head.state_dict().items()})
        return state


class InsLoc(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        encoder = (EncoderC4 if args.variant == "c4" else EncoderFPN)(args.arch)
        # Ghost BN (common.py): BN statistics over groups of --bn-batch samples, on both encoders
        self.encoder_q = convert_to_ghost_batchnorm(encoder, args.batch_size // world_size(), args.bn_batch)
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        # One queue per level: a level never meets another level's keys ("cross-level cheating").
        self.queues = nn.ModuleList(MomentumQueue(args.queue_size) for _ in self.encoder_q.levels)

    def forward(self, im_q, im_k, box_q, box_q_aug, box_k, colour=None):
        """colour (N, 2, 12): MoCo v2's colour part for the uint8 composites; None: float inputs, ready."""
        if colour is not None:
            im_q, im_k = photometric(im_q, colour[:, 0]), photometric(im_k, colour[:, 1])
        L = len(self.encoder_q.levels)
        # NOTE: C4's query pools the augmented box; FPN's pools it on P5 only, the true box on P2..P4 (the release).
        boxes_q = torch.stack([box_q] * (L - 1) + [box_q_aug], dim=1)  # (N, L, 4)
        q = self.encoder_q(im_q, boxes_q)  # (N, L, 128)
        ema_update(self.encoder_k, self.encoder_q, self.args.ema)
        boxes_k = box_k[:, None].expand(-1, L, -1)  # (N, L, 4): the key always pools the true box
        k = shuffled_key_forward(self.encoder_k, (im_k, boxes_k))  # (N, L, 128)
        loss, terms = insloc_loss(q, k, self.queues, self.encoder_q.levels, self.args.temperature)
        terms["box_iou"] = torchvision.ops.box_iou(box_q, box_q_aug).diagonal().mean()  # sec. 4.2 jitter
        terms.update(collapse_signals(dict(zip(self.encoder_q.levels, q.unbind(1)))))  # std_*, cos_*: docs/logs.md
        return loss, terms


# --- Loss ---


def insloc_loss(q, k, queues, levels, tau):
    """Sec. 4.3: per level, InfoNCE of q against k and that level's queue (then k is enqueued); the levels'
    losses are summed. q, k (N, L, 128) -> loss, terms (the total; per level too when L > 1)."""
    losses, accs = [], []
    for l, queue in enumerate(queues):
        loss_l, acc_l = info_nce(q[:, l], k[:, l], queue.keys.clone(), tau)
        queue.enqueue(k[:, l])
        losses.append(loss_l)
        accs.append(acc_l)
    loss = torch.stack(losses).sum()  # sec. 4.3: the levels' losses are summed
    terms = {"loss": loss.detach(), "acc": torch.stack(accs).mean()}
    if len(levels) > 1:  # per-level terms
        for level, loss_l, acc_l in zip(levels, losses, accs):
            terms.update({f"loss_{level}": loss_l.detach(), f"acc_{level}": acc_l})
    return loss, terms


# Same as dupr.py
def info_nce(q, k, queue, tau):
    """InfoNCE (MoCo eq. 1) in fp32, also under bf16 autocast. q, k: (N, D) positives row by row; queue: (K, D)."""
    with torch.autocast(q.device.type, enabled=False):  # autocast would run the (N, K) matmul in bf16
        q, k, queue = q.float(), k.float(), queue.float()
        l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
        l_neg = q @ queue.t()  # (N, K)
        logits = torch.cat([l_pos, l_neg], dim=1) / tau  # (N, 1 + K); the positive is class 0
        target = torch.zeros(len(q), dtype=torch.long, device=q.device)
        acc = (l_pos[:, 0] > l_neg.max(dim=1).values).float().mean()  # ties count as wrong
        return F.cross_entropy(logits, target), acc


# --- Training loop ---


# Same as dupr.py
def train_one_epoch(model, loader, optimizer, epoch, args, log):
    """One epoch (or --steps iterations): cosine lr per iteration, bf16 autocast, NaN guard, logs."""
    model.train()
    steps = min(args.steps, len(loader)) if args.steps else len(loader)
    sums, counts, end = {}, {}, time.time()
    since, window, waited = end, 0, 0.0  # img/s and data time average the steps since the last line
    for it, batch in enumerate(loader):
        if it == steps:
            break
        data_time = time.time() - end
        lr = args.lr_actual * 0.5 * (1 + math.cos(math.pi * (epoch + it / steps) / args.epochs))
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # insloc.py's --head-lr-scale
        batch = [t.to(args.device, non_blocking=True) for t in batch]
        if args.channels_last:  # NHWC convolutions are faster under bf16 on GPUs
            batch = [t.to(memory_format=torch.channels_last) if t.dim() == 4 else t for t in batch]
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss, terms = model(*batch)
        if not math.isfinite(loss.item()):
            path = os.path.join(args.output_dir, "checkpoint.pth")
            kept = "no checkpoint was written yet"
            kept = f"the last good checkpoint {path} is kept" if os.path.exists(path) else kept
            raise SystemExit(f"error: loss is {loss.item()} at epoch {epoch + 1} iteration {it + 1}; {kept}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        values = torch.stack([torch.as_tensor(value, dtype=torch.float32, device=args.device).detach()
                              for value in terms.values()])  # one device-to-host copy for all terms, not one each
        terms = dict(zip(terms, values.tolist()))
        if warning := collapse_warning(terms, args):  # once, if an embedding's std_ stays near 0 (common.py)
            log({"epoch": epoch, "event": "warning", "warning": warning})
        for name, value in terms.items():  # a term a step leaves out (DUPR: no overlap) is not averaged
            sums[name] = sums.get(name, 0.0) + value
            counts[name] = counts.get(name, 0) + 1
        end, window, waited = time.time(), window + 1, waited + data_time
        if it % args.print_freq == 0 or it == steps - 1:
            log({"epoch": epoch, "iteration": it, "steps": steps, "lr": lr, **terms,
                 "img_per_s": window * args.batch_size / (end - since), "data_time": waited / window,
                 "step_time": (end - since) / window, "memory_mb": peak_memory_mb(args)})
            since, window, waited = end, 0, 0.0
    return {name: value / counts[name] for name, value in sums.items()}


# --- Preview: --preview N draws both composites, the true and the augmented box, then exits ---


# Same as dupr.py
def to_picture(tensor, size):
    """A normalised (3, H, W) view back to a PIL image."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    array = ((tensor * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array).resize((size, size))


def write_preview(dataset, args, cell=128):
    """Per sample: foreground image | composites q, k (true box green, query's augmented box red) | views."""
    columns = ["foreground", "composite q", "composite k", "view q", "view k"]
    sheet = Image.new("RGB", (cell * len(columns), 16 + cell * args.preview + 34), "white")  # + legend
    draw, text = ImageDraw.Draw(sheet), font(12)
    for c, name in enumerate(columns):
        draw.text((c * cell + 4, 2), name, fill="black", font=text)
    for row in range(args.preview):
        image, views = dataset.sample(row)
        box_aug = augment_box(views[0]["box"], dataset.anchors) if args.box_aug else views[0]["box"]
        composites = torch.stack([v["composite"] for v in views])  # (2, 3, S, S) uint8
        cells = [image] + [TF.to_pil_image(c) for c in composites]
        views_after_colour = photometric(composites, draw_colour(2))  # (2, 3, S, S) normalised
        cells = [c.resize((cell, cell)) for c in cells] + [to_picture(v, cell) for v in views_after_colour]
        for c, picture in enumerate(cells):
            sheet.paste(picture, (c * cell, 16 + row * cell))
        for c in (1, 2, 3, 4):  # the same geometry on the composite and on the augmented view
            offset = torch.tensor([c * cell, 16 + row * cell] * 2)
            boxes = [(views[(c - 1) % 2]["box"], "lime")] + ([(box_aug, "red")] if c in (1, 3) else [])
            for box, colour in boxes:
                draw.rectangle((box * cell / args.image_size + offset).tolist(), outline=colour, width=2)
    draw.text((4, 17 + cell * args.preview), "green: the pasted foreground's box; red: the query's augmented box\n"
              "(the box RoIAlign pools for q)", fill="black", font=text)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "preview.png")
    sheet.save(path)
    print(f"wrote {path}")


# --- Plumbing: distributed setup, seeds, memory, logging, checkpoints ---


# Same as dupr.py
def setup_distributed(args):
    args.world_size, args.rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if torch.cuda.is_available():
        args.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(args.device)
    else:
        args.device = torch.device("cpu")
    if args.world_size > 1:
        dist.init_process_group("nccl" if args.device.type == "cuda" else "gloo")
    args.is_main = args.rank == 0
    args.amp = args.device.type == "cuda" if args.amp is None else args.amp
    args.channels_last = args.device.type == "cuda" if args.channels_last is None else args.channels_last
    args.lr_actual = args.lr * args.batch_size / 256


# Same as dupr.py
def seed_everything(seed):
    """Every epoch reseeds from (seed, epoch, rank), so a resumed run replays the same randomness."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# Same as dupr.py
def peak_memory_mb(args):
    if args.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# Same as dupr.py
def make_logger(args, start_epoch):
    """log(row): on the main process, a row of output-dir/log.jsonl with the wall-clock time, the time since
    this start and, in progress rows, the ETA of the whole run; and a console line. The first row of a start
    holds the arguments. A resume drops the rows of the epochs it redoes, so that no row is duplicated."""
    path, start = os.path.join(args.output_dir, "log.jsonl"), time.time()
    hms = lambda seconds: f"{int(seconds) // 3600}:{int(seconds) // 60 % 60:02d}:{int(seconds) % 60:02d}"

    def log(row):
        if not args.is_main:
            return
        row = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "elapsed_s": round(time.time() - start, 1), **row}
        if "iteration" in row:  # every remaining step of the run, at this start's pace so far
            done = (row["epoch"] - start_epoch) * row["steps"] + row["iteration"] + 1
            row["eta_s"] = row["elapsed_s"] / done * ((args.epochs - start_epoch) * row["steps"] - done)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        accuracy = [value for name, value in row.items() if name.startswith("acc")]
        epoch = row.get("epoch", args.epochs - 1) + 1  # 1-based
        where = f"{row['time'][5:]} +{hms(row['elapsed_s'])} epoch {epoch}/{args.epochs}"
        spread = [value for name, value in row.items() if name.startswith("std_")]  # the collapse signal
        scores = f"loss {row.get('loss', math.nan):.4f} acc {sum(accuracy) / max(len(accuracy), 1):.3f}"
        scores += f" std {min(spread):.3f}" if spread else ""
        if "iteration" in row:
            print(f"{where} [{row['iteration'] + 1}/{row['steps']}] {scores} lr {row['lr']:.5f} {row['img_per_s']:.1f} "
                  f"img/s data {100 * row['data_time'] / row['step_time']:.0f}% mem {row['memory_mb']:.0f} MB "
                  f"eta {hms(row['eta_s'])}", flush=True)
        elif "checkpoint" in row:
            print(f"{where} done: {scores} (epoch means); saved {row['checkpoint']}", flush=True)
        elif row.get("event") == "done":
            print(f"done: epochs {start_epoch + 1}-{args.epochs} in {hms(row['elapsed_s'])}; checkpoint.pth, "
                  f"backbone.pth, log.jsonl, loss.png in {args.output_dir}", flush=True)

    if args.is_main:  # the output directory appears only now, as training starts
        os.makedirs(args.output_dir, exist_ok=True)
        with open(path, "a+") as f, open(path + ".tmp", "w") as kept:
            f.seek(0)  # a resume keeps the rows of finished epochs and of earlier starts; a new run none
            kept.writelines(line for line in f if start_epoch and line.endswith("\n")
                            and json.loads(line).get("epoch", -1) < start_epoch)
        os.replace(path + ".tmp", path)
    arguments = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    log({"event": "resume" if start_epoch else "start", "epochs_done": start_epoch, "world_size": args.world_size,
         "torch": torch.__version__, "args": arguments})
    return log


# Same as dupr.py
def load_checkpoint(model, optimizer, args):
    """The epoch to start from: 0, or that of the checkpoint all ranks agree on, if its recipe is ours."""
    checkpoint = agreed_checkpoint(METHOD, args)
    if checkpoint is None:
        return 0
    start_epoch = resume_epoch(checkpoint, args)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    return start_epoch


def save_checkpoint(model, optimizer, epoch, args):
    """checkpoint.pth (everything to resume) and backbone.pth (torchvision keys), atomically."""
    state = {"method": METHOD, "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}}
    # backbone.pth: the ResNet, plus for fpn the FPN and box head under fpn. / box_head. (conventions.md)
    for name, obj in (("checkpoint.pth", state), ("backbone.pth", model.encoder_q.torchvision_state_dict())):
        path = os.path.join(args.output_dir, name)
        torch.save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)


# --- Main ---


def main(args):
    setup_distributed(args)
    source = open_source(args.data, TINY_IMAGES if args.tiny else 5000, args.image_size * 8 // 7,
                         min_side=args.image_size)
    dataset = InstanceComposition(source, args)
    if args.preview:
        return write_preview(dataset, args) if args.is_main else None
    if args.bench_loader:
        return bench_loader(dataset, args.bench_loader)
    seed_everything(args.seed)
    model = InsLoc(args).to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # NOTE: Nesterov momentum (spec, the release) where dilo.py uses plain momentum.
    heads = [p for name, p in model.encoder_q.named_parameters() if not name.startswith("backbone.")]
    groups = [{"params": model.encoder_q.backbone.parameters(), "lr_scale": 1.0},
              {"params": heads, "lr_scale": args.head_lr_scale}]
    optimizer = torch.optim.SGD(groups, lr=args.lr_actual, momentum=0.9, nesterov=True, weight_decay=args.wd)
    start_epoch = load_checkpoint(model, optimizer, args)
    if start_epoch == args.epochs:  # a finished run: resume_epoch said "nothing to do"
        return dist.destroy_process_group() if args.world_size > 1 else None
    optimizer.param_groups[1]["lr_scale"] = args.head_lr_scale  # the flag, not the checkpoint's value
    if args.is_main:
        count = lambda module: sum(p.numel() for p in module.parameters())
        print(f"world size {args.world_size}, device {args.device}, global batch {args.batch_size}, "
              f"lr {args.lr_actual:.4f} (= {args.lr} x {args.batch_size}/256; heads x {args.head_lr_scale:g}), "
              f"{len(dataset)} images, "
              f"backbone {count(model.encoder_q.backbone) / 1e6:.2f}M, "
              f"heads {(count(model.encoder_q) - count(model.encoder_q.backbone)) / 1e6:.2f}M params")
        print(batchnorm_groups(args), flush=True)
    ddp_model = model
    if args.world_size > 1:  # the queues are identical on every rank already: DDP must not broadcast buffers
        # before each forward. torch >= 2.13 calls that forward_sync_buffers and warns on broadcast_buffers.
        new = "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
        ddp_model = nn.parallel.DistributedDataParallel(
            model, **{"forward_sync_buffers" if new else "broadcast_buffers": False})
    sampler = torch.utils.data.DistributedSampler(dataset, args.world_size, args.rank, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size // args.world_size, sampler=sampler,
                                         num_workers=args.workers, pin_memory=args.device.type == "cuda",
                                         drop_last=True)
    if len(loader) == 0:
        raise SystemExit(f"error: {len(dataset)} images give no full batch of {args.batch_size}")
    log = make_logger(args, start_epoch)
    for name in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C; a scheduler or torchrun: one line, no traceback
        signal.signal(name, raise_interrupt)
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, args.epochs):
            seed_everything(args.seed + 1000 * (epoch + 1) + args.rank)
            sampler.set_epoch(epoch)
            stats = train_one_epoch(ddp_model, loader, optimizer, epoch, args, log)
            check_unreadable(source, args.device)  # distinct unreadable files of all ranks
            if args.is_main:
                save_checkpoint(model, optimizer, epoch + 1, args)
            stats.update(knn_monitor(model.encoder_q.backbone, epoch, args))  # --knn-every: all ranks extract
            if args.is_main:
                log({"epoch": epoch, **stats, "checkpoint": os.path.join(args.output_dir, "checkpoint.pth")})
                plot_log(os.path.join(args.output_dir, "log.jsonl"), os.path.join(args.output_dir, "loss.png"))
    except KeyboardInterrupt:
        stop_interrupted(epoch, args)
    except UnreadableImages as error:  # one line, not a DataLoader worker's chained traceback
        raise SystemExit(str(error)) from None
    log({"event": "done"})
    if args.world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(get_args())
