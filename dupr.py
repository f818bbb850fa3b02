"""DUPR: Deeply Unsupervised Patch Re-Identification for Pre-training Object Detectors.

Ding, Xie, Xu, Jiang, Li, Luo, Xia, IEEE TPAMI 2024, arXiv:2103.04814 (sec. 3.2).
No official code was released; every choice the paper leaves open is a NOTE at the code it governs.

Idea: MoCo v2 whose contrast is (1) image-level on four backbone levels conv2_x..conv5_x (sec. 3.2.2) and
(2) patch Re-ID (sec. 3.2.1): the intersection B of the two crops is cut into an S x S grid in each view
with RoIAlign; the patch at grid position p in view 1 and the patch at p in view 2 show the same part of the
original image and are a positive pair; patches of other images (a queue per level) are the negatives.
Positives are found by geometry, not by feature similarity, so the feature maps learn to tell places apart.

    python dupr.py --tiny                                    # toy world, CPU, 300 steps: all six terms fall
    python dupr.py --tiny --preview 8                        # both views, B and its S x S grid
    torchrun --nproc_per_node=8 dupr.py --data /imagenet
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 \\
        --nproc_per_node=8 dupr.py --data /imagenet
    python -m tools.iou_curve runs/dupr/backbone.pth B/backbone.pth   # Fig. 6 (eq. 9), Fig. 7 on frozen backbones

Recipe (defaults, the paper's ablation setting, sec. 3.2.3): MoCo v2 augmentation, ResNet-50, loss eq. 2
with alpha = (0.1, 0.4, 0.7, 1.0) on conv2..conv5 and beta = (0, 0, 1, 1), S = 14 on conv4_x and 7 on
conv5_x, tau 0.2, one queue of K = 65536 per loss term, 32 patch keys enqueued per 256 images, m 0.999,
lr 0.06 per 256, cosine, 200 epochs.
Expected (paper Table VII b, this recipe): VOC07+12 Faster R-CNN R50-C4 AP 58.5 / AP50 83.2 / AP75 65.2;
COCO Mask R-CNN R50-FPN 1x AP_bb 40.0 / AP_mk 36.2 (MoCo v2: 57.0 / 38.9). The main table (VOC AP 59.0)
adds RandAugment and tau 0.15.
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

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw

from common import (IMAGENET_MEAN, IMAGENET_STD, MomentumQueue, ResNetTrunk, UnreadableImages, add_knn_arguments,
                    agreed_checkpoint, batchnorm_groups, bench_loader, check_args, check_unreadable, collapse_signals,
                    collapse_warning, convert_to_ghost_batchnorm, draw_colour, ema_update, font, knn_monitor,
                    open_source, photometric, plot_log, raise_interrupt, resume_epoch, roi_align_boxes,
                    shuffled_key_forward, stop_interrupted, world_size)

# --- Arguments ---

# NOTE: resnet18, 64 px, batch 32 and queue 96 as in dilo.py's TINY, but one epoch of 9,600 images (300 steps): that
# is what it takes for all six loss terms to fall with the paper's lr and m (docs/tiny_runs.md); MoCo v2 alone needs
# about 1,250 steps (dilo.py: TINY). Every queue gets 32 keys a step, so 96 keys are the last 3 steps: no queue holds
# an image's own older keys as negatives (patch_enqueue 256 per 256 images = 32 per step at batch 32, as the image
# queues). roi_size = the feature maps' sides at 64 px (sec. 4.5.3: a larger S "will not acquire more useful
# information"; S = 14 on a 4 x 4 map made a tiny step 1.6x slower).
METHOD = "dupr"  # the name its checkpoints carry
TINY = dict(data="synthetic", arch="resnet18", image_size=64, batch_size=32, queue_size=96, bn_batch=8,
            epochs=1, workers=2, print_freq=20, roi_size=[16, 8, 4, 2], patch_enqueue=256)
TINY_IMAGES = 9600
LEVELS = ("conv2", "conv3", "conv4", "conv5")  # ResNetTrunk outputs, strides 4, 8, 16, 32


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="DUPR pretraining",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="synthetic", help="image folder (ImageNet layout aware) or 'synthetic'")
    parser.add_argument("--arch", default="resnet50", help="torchvision ResNet: resnet18/34/50/101/152")
    parser.add_argument("--epochs", type=int, default=200, help="epochs; the cosine lr schedule spans them")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch over all processes")
    parser.add_argument("--lr", type=float, default=0.06, help="base lr per 256 images (scaled linearly)")
    parser.add_argument("--wd", type=float, default=1e-4, help="weight decay")
    parser.add_argument("--workers", type=int, default=8, help="data loader workers per process")
    parser.add_argument("--image-size", type=int, default=224, help="view size, pixels")
    parser.add_argument("--queue-size", type=int, default=65536, help="K, keys in the queue")
    parser.add_argument("--temperature", type=float, default=0.2, help="tau of InfoNCE")
    parser.add_argument("--ema", type=float, default=0.999, help="m, key encoder momentum")
    parser.add_argument("--bn-batch", type=int, default=32,
                        help="samples per BatchNorm group, both encoders (per-GPU batch of the paper)")
    parser.add_argument("--output-dir", default="runs/dupr", help="checkpoint.pth, backbone.pth, log.jsonl, loss.png")
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
    # DUPR (sec. 3.2, eq. 2; Tables VI-VII). Each list has one value per level conv2..conv5.
    parser.add_argument("--alpha", type=float, nargs=4, default=[0.1, 0.4, 0.7, 1.0],
                        help="alpha_m, image-level loss weights (eq. 2); 0 = no head, no queue")
    parser.add_argument("--beta", type=float, nargs=4, default=[0.0, 0.0, 1.0, 1.0],
                        help="beta_m, patch-level loss weights (eq. 2); 0 = no head, no queue")
    # NOTE: S. Sec. 3.2.3 once says "S on conv5_x and conv4_x are 14 and 7", but the same paragraph's memory-bank
    # text, sec. 4.5.3 and Table VII say S = 7 on conv5_x and 14 on conv4_x (S = the feature map's side at 224 px);
    # we follow the latter. conv2/conv3 default to their map sides (56, 28) by that rule (used only if beta > 0 there).
    parser.add_argument("--roi-size", type=int, nargs=4, default=[56, 28, 14, 7],
                        help="S, side of the RoIAlign grid per level (used where beta > 0)")
    parser.add_argument("--patch-enqueue", type=int, default=32, help="key patch vectors enqueued per patch level "
                        "and step, per 256 images of global batch (split over processes, at least 1 each)")
    parser.add_argument("--patch-chunk", type=int, default=1024, metavar="ROWS",
                        help="patch InfoNCE rows scored against the queue at a time (1024 x 65537 fp32 logits = 256 "
                             "MB); 0 = all rows in one matrix. The same loss either way")
    args = parser.parse_args(argv)
    if args.tiny:  # the tiny recipe replaces defaults only: explicit flags still win
        parser.set_defaults(**TINY)
        args = parser.parse_args(argv)
    check_args(parser, args)
    if min(args.alpha + args.beta) < 0 or max(args.alpha + args.beta) == 0:
        parser.error(f"--alpha {args.alpha} --beta {args.beta}: weights must be >= 0, at least one > 0")
    if args.patch_chunk < 0:
        parser.error(f"--patch-chunk {args.patch_chunk}: must be >= 0 (0 = one matrix)")
    if min(args.roi_size + [args.patch_enqueue]) < 1:
        parser.error(f"--roi-size {args.roi_size} --patch-enqueue {args.patch_enqueue}: must be >= 1")
    return args


# --- Data: MoCo v2 views that remember their crop box and flip (sec. 3.2.1, eq. 3) ---


class MoCoV2ViewWithBox:
    """MoCo v2's geometry of one view, RandomResizedCrop then a horizontal flip with p 0.5, that also returns R_v,
    the crop box in original pixels (x1, y1, x2, y2), and whether the view was flipped. `size` is an int or
    (height, width). Input and view are (3, H, W) tensors (uint8 in training); the colour part runs on the training
    device (common.photometric; flip commutes with it)."""

    def __init__(self, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size = [size, size] if isinstance(size, int) else list(size)
        self.scale, self.ratio = scale, ratio

    def __call__(self, image):
        top, left, height, width = T.RandomResizedCrop.get_params(image, self.scale, self.ratio)
        view = TF.resized_crop(image, top, left, height, width, self.size, antialias=True)
        flipped = bool(torch.rand(()) < 0.5)  # RandomHorizontalFlip, recorded
        if flipped:
            view = TF.hflip(view)
        return view, (left, top, left + width, top + height), flipped


class TwoViewsWithBoxes(torch.utils.data.Dataset):
    """Item -> (view_q, view_k (3, S, S) uint8, crop_q (4,), crop_k (4,), flip_q, flip_k, colour (2, 12)):
    crops in original pixels, each view's photometric parameters (common.draw_colour)."""

    def __init__(self, source, args):
        self.source = source
        self.augment = MoCoV2ViewWithBox(args.image_size)

    def __len__(self):
        return len(self.source)

    def sample(self, index):
        image, _ = self.source[index]
        pixels = TF.pil_to_tensor(image)  # (3, H, W) uint8, decoded once for both views
        return image, [self.augment(pixels) for _ in range(2)]

    def __getitem__(self, index):
        _, ((view_q, crop_q, flip_q), (view_k, crop_k, flip_k)) = self.sample(index)
        return (view_q, view_k, torch.tensor(crop_q, dtype=torch.float32), torch.tensor(crop_k, dtype=torch.float32),
                torch.tensor(flip_q), torch.tensor(flip_k), draw_colour(2))


def intersection_in_views(crop_1, crop_2, flip_1, flip_2, size_1, size_2):
    """Eq. 4 and T_1, T_2 (sec. 3.2.1): the intersection B of the crops, in each view's pixels.
    crop_v: (N, 4) R_v xyxy in original pixels; flip_v: (N,) bool; size_v: (width, height) of view v.
    Returns B_1, B_2 (N, 4) xyxy in view pixels, x1 < x2 also in flipped views, and valid (N,): False where the
    crops overlap by less than a pixel (B_v is then the whole view, a placeholder that keeps RoIAlign well defined).
    NOTE: the geometry. B is mapped into a view by x' = (x - crop_x1) * view_w / crop_w, then mirrored for a flipped
    view (x' -> view_w - x', endpoints swapped); roi_grid reverses a flipped view's S x S output along its width, so
    cell (r, c) covers the same original pixels in both views (test_dupr_geometry checks it on coordinate images).
    NOTE: "no overlap" includes a degenerate intersection less than one original pixel wide or tall. Such a pair adds
    no patch loss and no patch keys; its image loss is kept; a batch with no overlapping pair is left out of the
    patch terms' epoch means. The share of such pairs is logged (`no_overlap`). The paper saw 51 of 1,472 (3.5%);
    MoCo v2 crops (scale 0.2-1) of a 500 x 375 image give 0.4% (500 x 333: 1.2%), and scale 0.08-1 would give 3.0%:
    the authors' crops likely differed. We keep MoCo v2's crops (the paper's ablation setting).
    """
    B = torch.cat([torch.maximum(crop_1[:, :2], crop_2[:, :2]), torch.minimum(crop_1[:, 2:], crop_2[:, 2:])], 1)
    valid = (B[:, 2] - B[:, 0] >= 1) & (B[:, 3] - B[:, 1] >= 1)  # (N,)
    views = []
    for crop, flipped, (width, height) in ((crop_1, flip_1, size_1), (crop_2, flip_2, size_2)):
        scale = B.new_tensor([width, height]) / (crop[:, 2:] - crop[:, :2])  # (N, 2) view px per original px
        box = (B - crop[:, :2].repeat(1, 2)) * scale.repeat(1, 2)  # (N, 4) x' = (x - crop_x1) * view_w / crop_w
        mirrored = torch.stack([width - box[:, 2], box[:, 1], width - box[:, 0], box[:, 3]], 1)  # x' -> w - x'
        box = torch.where(flipped[:, None], mirrored, box)
        views.append(torch.where(valid[:, None], box, B.new_tensor([0, 0, width, height])))
    return views[0], views[1], valid


def roi_grid(features, boxes, flipped, S, stride):
    """RoIAlign(f(I_v), B_v) of eq. 5-6 -> (N, C, S, S) in original-image orientation (flipped: reversed in width).
    NOTE: RoIAlign runs in fp32 (common.roi_align_boxes casts features and boxes; bf16 boxes would round by up to
    0.5 px at 224) with adaptive sampling, ceil(bin side / feature cell) points a side. The paper does not say;
    adaptive is Detectron2's default (the paper fine-tunes with it) and InsLoc's release. B is at most the view, so
    with S = the map's side a bin is at most one cell and is read at its centre, where a fixed 2 x 2 would only
    smooth within the cell."""
    grid = roi_align_boxes(features, boxes, S, stride, sampling_ratio=0)  # (N, C, S, S)
    return torch.where(flipped[:, None, None, None], grid.flip(-1), grid)


# --- Model: f = ResNet; h^(m) image heads, g^(m) patch heads; key encoder; one queue per term ---


# NOTE: heads. h^(m) (image): global average pool -> Linear(C, C) -> ReLU -> Linear(C, 128), MoCo v2's head, one per
# level. g^(m) (patch): the paper's "pixel-wise MLP implemented by a 1x1 convolution", read as
# Conv1x1(C, C) -> ReLU -> Conv1x1(C, 128), on the RoIAlign output. Every embedding is L2-normalised (per position
# for patches). g_2, h_2 are the momentum copies (DUPR.encoder_k).
# NOTE: a level whose alpha (beta) is 0 has no image (patch) head and no queue.
class Encoder(nn.Module):
    def __init__(self, arch, alpha, beta, roi_size, dim=128):
        super().__init__()
        self.backbone = ResNetTrunk(arch)
        C = dict(zip(LEVELS, self.backbone.channels))
        self.stride, self.S = dict(zip(LEVELS, self.backbone.strides)), dict(zip(LEVELS, roi_size))
        self.image_heads = nn.ModuleDict({m: nn.Sequential(  # MoCo v2's MLP head on the pooled map
            nn.Linear(C[m], C[m]), nn.ReLU(inplace=True), nn.Linear(C[m], dim))
            for m, a in zip(LEVELS, alpha) if a > 0})
        self.patch_heads = nn.ModuleDict({m: nn.Sequential(  # pixel-wise MLP as 1x1 convolutions (eq. 5)
            nn.Conv2d(C[m], C[m], 1), nn.ReLU(inplace=True), nn.Conv2d(C[m], dim, 1))
            for m, b in zip(LEVELS, beta) if b > 0})

    def forward(self, x, boxes, flipped):
        """x (N, 3, H, W), boxes B (N, 4) in view pixels -> v^(m) (N, 128) per image head, then r^(m) (N, S*S, 128)."""
        features = dict(zip(LEVELS, self.backbone(x)))  # conv2..conv5, (N, C_m, H/stride, W/stride)
        v = [F.normalize(head(features[m].mean(dim=(2, 3))), dim=1) for m, head in self.image_heads.items()]
        r = []
        for m, head in self.patch_heads.items():
            grid = roi_grid(features[m], boxes, flipped, self.S[m], self.stride[m])  # (N, C, S, S)
            r.append(F.normalize(head(grid), dim=1).flatten(2).transpose(1, 2))  # (N, S*S, 128)
        return tuple(v + r)


class DUPR(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        encoder = Encoder(args.arch, args.alpha, args.beta, args.roi_size)
        # Ghost BN (common.py): BN statistics over groups of --bn-batch samples, on both encoders
        self.encoder_q = convert_to_ghost_batchnorm(encoder, args.batch_size // world_size(), args.bn_batch)
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        # NOTE: sec. 3.2.3, "a unique memory bank for each ... contrastive loss in eq. 2"
        self.image_queues = nn.ModuleDict({m: MomentumQueue(args.queue_size) for m in self.encoder_q.image_heads})
        self.patch_queues = nn.ModuleDict({m: MomentumQueue(args.queue_size) for m in self.encoder_q.patch_heads})

    def forward(self, im_q, im_k, crop_q, crop_k, flip_q, flip_k, colour=None):
        """colour (N, 2, 12): MoCo v2's colour part for the uint8 views; None: float inputs, ready."""
        if colour is not None:
            im_q, im_k = photometric(im_q, colour[:, 0]), photometric(im_k, colour[:, 1])
        size_q, size_k = (im_q.shape[-1], im_q.shape[-2]), (im_k.shape[-1], im_k.shape[-2])  # (width, height)
        B_q, B_k, valid = intersection_in_views(crop_q, crop_k, flip_q, flip_k, size_q, size_k)
        # NOTE: the loss is asymmetric (view 1 = query, view 2 = key), as MoCo v2.
        q = self.encoder_q(im_q, B_q, flip_q)  # v^(m) (N, 128) per image level, then r^(m) (N, S*S, 128)
        ema_update(self.encoder_k, self.encoder_q, self.args.ema)
        # Shuffle BN: the boxes and flips travel with their images; only embeddings come back.
        k = shuffled_key_forward(self.encoder_k, (im_k, B_k, flip_k))
        k = k if isinstance(k, tuple) else (k,)
        images = list(enumerate(self.image_queues.items()))  # (index into q and k, (m, queue))
        patches = list(enumerate(self.patch_queues.items(), start=len(images)))
        tau, terms = self.args.temperature, {}
        for i, (m, queue) in images:  # eq. 8; clone: enqueue writes in place
            terms[f"image_{m}"], terms[f"acc_image_{m}"] = info_nce(q[i], k[i], queue.keys.clone(), tau)
        for i, (m, queue) in patches:  # eq. 7, --patch-chunk rows of logits at a time; the chunked loss keeps
            keys = queue.keys if self.args.patch_chunk else queue.keys.clone()  # no queue for its backward
            terms[f"patch_{m}"], terms[f"acc_patch_{m}"] = patch_info_nce(q[i], k[i], valid, keys, tau,
                                                                          self.args.patch_chunk)
        terms.update(collapse_signals({f"image_{m}": q[i] for i, (m, _) in images}  # std_*, cos_*: docs/logs.md
                                      | {f"patch_{m}": q[i][valid] for i, (m, _) in patches}))  # (n_valid, S*S, 128)
        alpha, beta = dict(zip(LEVELS, self.args.alpha)), dict(zip(LEVELS, self.args.beta))
        loss = (sum(alpha[m] * terms[f"image_{m}"] for _, (m, _) in images)  # eq. 2
                + sum(beta[m] * terms[f"patch_{m}"] for _, (m, _) in patches))
        for i, (m, queue) in images:
            queue.enqueue(k[i])
        n = patch_keys_per_process(self.args.patch_enqueue, len(im_q) * world_size())
        for i, (m, queue) in patches:
            queue.enqueue(sample_patch_keys(k[i], valid, n))
        overlap = bool(valid.any())  # else the patch terms are left out of this step's log and the epoch means
        terms = {name: value.detach() for name, value in terms.items() if overlap or "patch_" not in name}
        return loss, {"loss": loss.detach(), **terms, "no_overlap": 1 - valid.float().mean()}


# NOTE: sec. 3.2.3, "in a batch with 256 images, we sample 32 patch features": --patch-enqueue 32 key patch vectors
# per patch level and step per 256 images of GLOBAL batch, split over the processes (each enqueues its share, at
# least 1), drawn uniformly without replacement from the valid (image, position) pairs of its local batch. So the
# queues refresh at the same rate on any GPU count.
def patch_keys_per_process(per_256, global_batch):
    """This process's share of per_256 * global_batch / 256 keys (ranks below the remainder take one more)."""
    total = max(1, round(per_256 * global_batch / 256))
    world, rank = world_size(), dist.get_rank() if world_size() > 1 else 0
    return max(1, total // world + (rank < total % world))


def sample_patch_keys(r_k, valid, n):
    """n key vectors drawn without replacement (sec. 3.2.3: "most patch features from a single image are similar")."""
    keys = r_k[valid].flatten(0, 1)  # (n_valid * S*S, 128)
    return keys[torch.randperm(len(keys), device=keys.device)[:n]]  # (min(n, n_valid * S*S), 128)


# --- Loss ---


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


def patch_info_nce(r_q, r_k, valid, queue, tau, chunk=0):
    """Eq. 7: every valid (image, position p) is one query r_1,p with its positive r_2,p. r_q, r_k: (N, S*S, D)
    with cell p at the same original place in both; valid: (N,) bool; chunk: rows of logits at a time
    (ChunkedInfoNCE), 0 = one (rows, 1 + K) matrix (info_nce).
    NOTE: eq. 7 sums over positions p; a level's patch loss here is the MEAN over all valid (image, position) queries
    of the batch, so conv4 (196 cells) and conv5 (49) weigh alike.
    NOTE: patch negatives are the queue only (eq. 7), not other cells of the batch."""
    if not valid.any():  # no pair overlaps: no patch loss, but keep the head in the graph (DDP)
        return 0.0 * r_q.sum(), r_q.new_zeros(())
    q, k = r_q[valid].flatten(0, 1), r_k[valid].flatten(0, 1)  # (n_valid * S*S, D)
    if chunk <= 0:
        return info_nce(q, k, queue, tau)
    return ChunkedInfoNCE.apply(q, k, queue, tau, chunk, torch.is_grad_enabled() and q.requires_grad)


class ChunkedInfoNCE(torch.autograd.Function):
    """info_nce's loss and accuracy, `chunk` rows of logits at a time, and the gradient of the queries.
    NOTE: cost. Eq. 7 makes every cell a query against the whole queue: at K 65536 and 32 images per GPU, conv4 and
    conv5 give 7,840 x 65,537 logits (2.1 GB fp32; conv4 alone 6,272 rows, 1.64 GB), about 25% more FLOPs than a
    MoCo v2 step (the 1x1-conv patch heads add about 11%; docs/benchmarks.md), and cross-entropy keeps their
    log-softmax and the backward their gradient. The loss is a mean of per-row terms and its gradient is per row,
        L = mean_i (lse_i - l_pos,i / tau),    dL/dq_i = ((p_i,0 - 1) k_i + sum_j p_i,j queue_j) / (tau R),
    with p the row's softmax: so each chunk's logits are formed, reduced to lse, acc and dL/dq for its rows, and
    freed. No tensor larger than chunk x (1 + K) exists, and the backward only scales the stored gradient (R x D),
    so there are no recomputed logits: the same loss, gradient and matmul count. The keys and the queue come from
    the momentum encoder and get no gradient, as in info_nce."""

    @staticmethod
    def forward(ctx, q, k, queue, tau, chunk, needs_grad):
        with torch.autocast(q.device.type, enabled=False):  # fp32 logits, as info_nce
            q32, k, queue = q.float(), k.float(), queue.float()
            l_pos = (q32 * k).sum(dim=1)  # (R,)
            losses, hits = torch.empty_like(l_pos), torch.empty_like(l_pos)
            grad = torch.empty_like(q32) if needs_grad else None
            for start in range(0, len(q32), chunk):
                rows = slice(start, start + chunk)
                l_neg = q32[rows] @ queue.t()  # (chunk, K)
                logits = torch.cat([l_pos[rows, None], l_neg], dim=1) / tau  # (chunk, 1 + K), positive first
                lse = torch.logsumexp(logits, dim=1)  # (chunk,)
                losses[rows] = lse - logits[:, 0]
                hits[rows] = (l_pos[rows] > l_neg.max(dim=1).values).float()  # ties count as wrong
                if needs_grad:
                    del l_neg
                    p = logits.sub_(lse[:, None]).exp_()  # (chunk, 1 + K) softmax, in place of the logits
                    grad[rows] = ((p[:, 0, None] - 1) * k[rows] + p[:, 1:] @ queue) / (tau * len(q32))
        ctx.save_for_backward(grad)
        ctx.dtype = q.dtype
        return losses.mean(), hits.mean()

    @staticmethod
    def backward(ctx, grad_loss, grad_acc):
        grad, = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.dtype), None, None, None, None, None


# --- Training loop ---


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


# --- Preview ---


def to_picture(tensor, size):
    """A normalised (3, H, W) view back to a PIL image."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    array = ((tensor * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array).resize((size, size))


def write_preview(dataset, args, cell=160):
    """Per sample: the original with R_q (red), R_k (blue), B (yellow); each view with B_v and its S x S grid (S of
    the last patch level), a dot on grid cell (0, 0): B's top-left in the original, top-right in a flipped view."""
    S = ([S for S, b in zip(args.roi_size, args.beta) if b > 0] or [1])[-1]
    columns = ["original: R_q, R_k, B", "view q: B_q, S x S", "view k: B_k, S x S"]
    sheet = Image.new("RGB", (cell * len(columns), 16 + cell * args.preview + 34), "white")  # + legend
    draw, text = ImageDraw.Draw(sheet), font(12)
    for c, name in enumerate(columns):
        draw.text((c * cell + 4, 2), name, fill="black", font=text)
    for row in range(args.preview):
        image, views = dataset.sample(row)
        top = 16 + row * cell
        sheet.paste(image.resize((cell, cell)), (0, top))
        crops = torch.tensor([crop for _, crop, _ in views], dtype=torch.float32)[:, None]  # (2, 1, 4)
        flips = torch.tensor([[flipped] for _, _, flipped in views])  # (2, 1)
        B_q, B_k, valid = intersection_in_views(crops[0], crops[1], flips[0], flips[1], (cell, cell), (cell, cell))
        scale = torch.tensor([cell / image.width, cell / image.height] * 2)
        B = torch.cat([crops[:, 0, :2].max(0).values, crops[:, 0, 2:].min(0).values])
        for box, colour in ((crops[0, 0], "red"), (crops[1, 0], "blue")) + (((B, "yellow"),) if valid else ()):
            draw.rectangle((box * scale + torch.tensor([0, top, 0, top])).tolist(), outline=colour, width=2)
        colour = draw_colour(2)
        for c, ((view, _, flipped), box) in enumerate(zip(views, (B_q[0], B_k[0])), start=1):
            sheet.paste(to_picture(photometric(view[None], colour[c - 1:c])[0], cell), (c * cell, top))
            draw.text((c * cell + 4, top + 4), "flipped" if flipped else "not flipped", fill="yellow", font=text)
            if not valid:
                draw.text((c * cell + 4, top + 16), "no overlap: no patch loss", fill="red", font=text)
                continue
            x1, y1, x2, y2 = (box + torch.tensor([c * cell, top, c * cell, top])).tolist()
            for i in range(S + 1):  # the S x S grid of B_v
                x, y = x1 + (x2 - x1) * i / S, y1 + (y2 - y1) * i / S
                draw.line((x, y1, x, y2), fill="yellow")
                draw.line((x1, y, x2, y), fill="yellow")
            cx = x2 - (x2 - x1) / (2 * S) if flipped else x1 + (x2 - x1) / (2 * S)
            cy = y1 + (y2 - y1) / (2 * S)
            draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill="red")
    draw.text((4, 17 + cell * args.preview), "red: R_q, blue: R_k, yellow: their intersection B;\n"
              "views: B_v, its S x S grid, red dot: cell (0, 0)", fill="black", font=text)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "preview.png")
    sheet.save(path)
    print(f"wrote {path}")


# --- Plumbing: distributed setup, seeds, memory, logging, checkpoints ---
# info_nce, train_one_epoch, to_picture and the plumbing are copied as is into dilo.py, detco.py and
# insloc.py (# Same as dupr.py; test_the_deliberate_copies_are_identical checks it).


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


def seed_everything(seed):
    """Every epoch reseeds from (seed, epoch, rank), so a resumed run replays the same randomness."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def peak_memory_mb(args):
    if args.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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
    for name, obj in (("checkpoint.pth", state), ("backbone.pth", model.encoder_q.backbone.state_dict())):
        path = os.path.join(args.output_dir, name)
        torch.save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)


# --- Main ---


def main(args):
    setup_distributed(args)
    source = open_source(args.data, TINY_IMAGES if args.tiny else 5000, args.image_size * 8 // 7,
                         min_side=args.image_size)
    dataset = TwoViewsWithBoxes(source, args)
    if args.preview:
        return write_preview(dataset, args) if args.is_main else None
    if args.bench_loader:
        return bench_loader(dataset, args.bench_loader)
    seed_everything(args.seed)
    model = DUPR(args).to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=args.lr_actual, momentum=0.9, weight_decay=args.wd)
    start_epoch = load_checkpoint(model, optimizer, args)
    if start_epoch == args.epochs:  # a finished run: resume_epoch said "nothing to do"
        return dist.destroy_process_group() if args.world_size > 1 else None
    if args.is_main:
        count = lambda module: sum(p.numel() for p in module.parameters())
        print(f"world size {args.world_size}, device {args.device}, global batch {args.batch_size}, "
              f"lr {args.lr_actual:.4f} (= {args.lr} x {args.batch_size}/256), {len(dataset)} images, "
              f"backbone {count(model.encoder_q.backbone) / 1e6:.2f}M params\nheads " + ", ".join(
                  f"{kind} {m} {count(head) / 1e6:.2f}M" for kind, heads in (("image", model.encoder_q.image_heads),
                  ("patch", model.encoder_q.patch_heads)) for m, head in heads.items()) + " params")
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
