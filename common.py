"""What every trainer of this repository shares, and nothing else.

- `ResNetTrunk`: torchvision's ResNet without `avgpool`/`fc`, returning conv2_x..conv5_x
  (strides 4/8/16/32). Its state_dict keys ARE torchvision's (`layer4.2.bn3.weight`).
- `roi_align_boxes`: torchvision RoIAlign with boxes in input-image pixels, one per sample;
  `load_backbone`: a trunk from any backbone.pth, torchvision state_dict or checkpoint.pth.
- The MoCo machinery: `MomentumQueue`, `ema_update`, `concat_all_gather`,
  `shuffled_key_forward` (shuffle BN, MoCo sec. 3.3), and ghost BatchNorm
  (`convert_to_ghost_batchnorm`): BN statistics over groups of `--bn-batch` samples.
- The data sources: `ImageFolderSource` (any folder of images, ImageNet `train/` aware)
  and `ToyWorld`, the built-in synthetic dataset, with `write_toy_world` (files + COCO json);
  `HeldOut`, the analysis tools' images with boxes (toy world val or a COCO-format folder).
- MoCo v2's colour augmentation on the device: `draw_colour` (loader), `photometric` (forward); `bench_loader`.
- Resuming: `read_checkpoint`, `agreed_checkpoint`, `resume_epoch`, `raise_interrupt`, `stop_interrupted`.
- Plumbing: `check_args` (the shared flags' ranges) and `plot_log` (loss.png from log.jsonl).

Nothing here carries a paper's claim: changing this file must not change one method's
recipe without changing all of them.
"""
import hashlib
import json
import math
import os
import pickle
import pickletools
import signal
import socket
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ---------------------------------------------------------------------------------------
# ResNet trunk and RoIAlign
# ---------------------------------------------------------------------------------------


class ResNetTrunk(nn.Module):
    """torchvision ResNet minus avgpool/fc. forward(x) -> [c2, c3, c4, c5]."""

    def __init__(self, arch):
        super().__init__()
        if arch not in ARCHS:
            raise SystemExit(f"error: --arch {arch} is not one of {', '.join(ARCHS)}")
        net = torchvision.models.get_model(arch, weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        width = 4 * 64 if arch in ("resnet50", "resnet101", "resnet152") else 64
        self.channels = [width, 2 * width, 4 * width, 8 * width]  # c2..c5
        self.strides = [4, 8, 16, 32]

    def forward_to_res4(self, x):
        """Stem + res2..res4: the C4 detector's backbone (stride 16)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return [c2, c3, c4, self.layer4(c4)]


def roi_align_boxes(features, boxes, output_size, stride, sampling_ratio, batch_index=None):
    """RoIAlign one box per row of `boxes` (N, 4) xyxy in input-image pixels.

    Box i is pooled from image `batch_index[i]` (default: image i). aligned=True shifts by
    half a pixel so that a box [0, W] covers exactly the feature map (Detectron2 convention).
    sampling_ratio: bilinear samples per bin side; 0 = adaptive, ceil(bin size in feature
    cells), so a bin's samples are at most one cell apart (each trainer says which it uses).
    Returns (N, C, S, S).
    """
    if batch_index is None:
        batch_index = torch.arange(len(boxes), device=boxes.device)
    rois = torch.cat([batch_index.to(boxes.dtype)[:, None], boxes], dim=1)  # (N, 5)
    # fp32 on purpose: bf16 box coordinates would be rounded by up to a pixel above 128.
    return torchvision.ops.roi_align(features.float(), rois.float(), output_size, spatial_scale=1.0 / stride,
                                     sampling_ratio=sampling_ratio, aligned=True).to(features.dtype)


RESNET_BY_BLOCKS = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50",
                    (True, 23): "resnet101", (True, 36): "resnet152"}  # (bottleneck, blocks in layer3)


def load_backbone(path, flag):
    """(ResNetTrunk in eval mode, arch) from any trainer's backbone.pth (fpn./box_head. keys dropped) or
    checkpoint.pth, or a torchvision ResNet state_dict. Anything else: a one-line error naming `flag`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # missing file, not a torch file, or a pickle weights_only refuses
        raise SystemExit(f"error: {flag} {path}: not a readable torch file ({type(error).__name__})")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # checkpoint.pth: f_q's ResNet
        state = {k.split("backbone.", 1)[1]: v for k, v in state["model"].items() if k.startswith("encoder_q.backbone.")}
    state = state if isinstance(state, dict) else {}
    blocks = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("layer3.")), default=-1)
    arch = RESNET_BY_BLOCKS.get(("layer1.0.conv3.weight" in state, blocks))
    if arch is None:
        raise SystemExit(f"error: {flag} {path}: no torchvision ResNet weights in it")
    trunk = ResNetTrunk(arch)
    try:  # strict: every trunk tensor must be there, with its shape
        trunk.load_state_dict({k: v for k, v in state.items() if k in trunk.state_dict()})
    except RuntimeError as error:
        raise SystemExit(f"error: {flag} {path}: not a complete {arch} ({str(error).splitlines()[0]})")
    return trunk.eval().requires_grad_(False), arch


# ---------------------------------------------------------------------------------------
# MoCo machinery: gather, queue, EMA, shuffle BN, ghost BN
# ---------------------------------------------------------------------------------------


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def concat_all_gather(tensor):
    """Concatenate `tensor` over processes along dim 0 (rank order). Rows may differ per rank.

    No gradient flows through it. No-op at world size 1.
    """
    if world_size() == 1:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([len(tensor)], device=tensor.device))
    sizes = [int(s) for s in sizes]
    padded = tensor.new_zeros((max(sizes),) + tensor.shape[1:])
    padded[:len(tensor)] = tensor
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)])


class MomentumQueue(nn.Module):
    """Ring buffer of the K most recent keys (MoCo's dictionary). Keys are all-gathered first.

    `keys` starts as L2-normalised random vectors; both buffers are saved in checkpoints.
    """

    def __init__(self, K, dim=128):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(K, dim), dim=1))  # (K, dim)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, k):
        k = concat_all_gather(k.detach().float())  # (world * n, dim)
        K, n = len(self.keys), len(k)
        # Writing n keys one after another leaves the last min(n, K) of them in the buffer.
        kept = min(n, K)
        slots = (self.ptr + torch.arange(n - kept, n, device=k.device)) % K
        self.keys[slots] = k[n - kept:]
        self.ptr.copy_((self.ptr + n) % K)


@torch.no_grad()
def ema_update(encoder_k, encoder_q, m):
    """p_k = m * p_k + (1 - m) * p_q over parameters only (BN buffers come from f_k's own passes)."""
    for p_k, p_q in zip(encoder_k.parameters(), encoder_q.parameters()):
        p_k.mul_(m).add_(p_q.detach(), alpha=1.0 - m)


def _broadcast_permutation(n, device):
    perm = torch.randperm(n, device=device)
    if world_size() > 1:
        dist.broadcast(perm, src=0)
    return perm


@torch.no_grad()
def shuffled_key_forward(fn, inputs):
    """Shuffle BN (MoCo sec. 3.3): run `fn` on a random split of the key batch.

    `inputs` is a tuple of tensors whose dim 0 is the local batch (images, boxes, ...).
    They are gathered over processes, permuted with one permutation shared by all ranks,
    each rank runs `fn(*slice)` once on its slice (ghost BN in `fn` splits the slice into
    random groups of --bn-batch samples, as the paper's GPUs), and only the outputs (small
    embeddings, dim 0 = samples) are gathered back and un-permuted.
    Returns the outputs for this rank's own samples, in their original order.
    """
    local = len(inputs[0])
    gathered = [concat_all_gather(t) for t in inputs]  # each (world * local, ...)
    perm = _broadcast_permutation(len(gathered[0]), gathered[0].device)
    rank = dist.get_rank() if world_size() > 1 else 0
    mine = perm[rank * local:(rank + 1) * local]
    outputs = fn(*[t[mine] for t in gathered])  # one forward of the whole shuffled slice
    results = []
    for out in outputs if isinstance(outputs, tuple) else (outputs,):
        shuffled = concat_all_gather(out)  # rows in `perm` order
        unshuffled = torch.empty_like(shuffled)
        unshuffled[perm] = shuffled
        results.append(unshuffled[rank * local:(rank + 1) * local])
    return tuple(results) if len(results) > 1 else results[0]


# NOTE: ghost BatchNorm. The papers train on 8 GPUs x 32 images with per-GPU BN (no SyncBN).
#   Ghost BN normalises each of G = local batch / --bn-batch groups with its own statistics,
#   so one GPU with batch 256 (G = 8) reproduces the per-GPU BN statistics of the 8-GPU recipe
#   on both encoders (trunk, InsLoc's FPN and box head). Query: sample i is in group i % G;
#   DistributedSampler gives rank g of 8 the samples g, g + 8, ... of the same index order, so
#   the images sharing statistics are those of one GPU of the 8-GPU run (same --seed). Key: a
#   random split, as shuffle BN's. Running statistics: every group's mean and unbiased variance
#   get the usual momentum update and the G results are averaged. The EMA is linear, so this is
#   exactly the average of the 8 ranks' running statistics. MoCo's main_moco.py wraps the model in
#   DDP with its default broadcast_buffers=True: before every forward rank 0's buffers overwrite
#   the others', so the statistics it saves are rank 0's EMA over rank 0's batches. Our trainers
#   under torchrun turn the broadcast off (the queues are identical on every rank already); each
#   rank keeps its own EMA and rank 0 saves its own, the same quantity. One process saves the mean
#   over the G groups: the same expectation, less noise. Only the saved BatchNorm statistics
#   differ; training uses batch statistics, so losses and weights do not. Not reproduced: the
#   all-gather and its cost, per-rank randomness (augmentations, the random split). G = 1 is nn.BatchNorm.


def ghost_batch_norm(bn, x):
    """Training-mode BN of x (N, C, *) over G = bn.groups groups: rows g, g + G, ... share statistics.

    One batch_norm call on the view (N/G, G*C, *): channel g*C + c of the view is channel c of
    group g, with weight, bias and running statistics repeated G times.
    """
    N, C, G = x.shape[0], x.shape[1], bn.groups
    if N % G:
        raise ValueError(f"ghost BatchNorm: a batch of {N} does not split into {G} groups")
    grouped = x.reshape(N // G, G * C, *x.shape[2:])  # a view if x is contiguous (a copy if channels_last)
    momentum, running_mean, running_var = bn.momentum or 0.0, None, None
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative average, as nn.BatchNorm
            momentum = 1.0 / float(bn.num_batches_tracked)
        running_mean, running_var = bn.running_mean.repeat(G), bn.running_var.repeat(G)  # (G*C,) copies
    weight = bn.weight.repeat(G) if bn.affine else None  # gradients of the G copies add up
    bias = bn.bias.repeat(G) if bn.affine else None
    y = F.batch_norm(grouped, running_mean, running_var, weight, bias, True, momentum, bn.eps)
    if bn.track_running_stats:  # each group's momentum update, averaged over groups
        with torch.no_grad():
            bn.running_mean.copy_(running_mean.view(G, C).mean(0))
            bn.running_var.copy_(running_var.view(G, C).mean(0))
    return y.reshape(x.shape)


class GhostBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d (same parameters, buffers, state_dict keys) with ghost statistics in training."""

    groups = 1  # set by convert_to_ghost_batchnorm

    def forward(self, x):
        return ghost_batch_norm(self, x) if self.training and self.groups > 1 else super().forward(x)


class GhostBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters, buffers, state_dict keys) with ghost statistics in training."""

    groups = 1  # set by convert_to_ghost_batchnorm

    def forward(self, x):
        return ghost_batch_norm(self, x) if self.training and self.groups > 1 else super().forward(x)


def convert_to_ghost_batchnorm(module, local_batch, bn_batch):
    """Returns `module` with every nn.BatchNorm1d/2d replaced by its ghost version (sharing its
    parameters and buffers), as nn.SyncBatchNorm.convert_sync_batchnorm does.

    G = local_batch / bn_batch groups (1 if local_batch <= bn_batch). A layer that sees k rows
    per sample (DetCo's 9 patches, InsLoc's 4 RoIs) must get them as k blocks of local_batch
    rows, so that sample i's rows are in group i % G.
    """
    if local_batch > bn_batch and local_batch % bn_batch:
        raise SystemExit(f"error: --bn-batch {bn_batch} does not divide the per-process batch {local_batch}")
    ghost_class = {nn.BatchNorm1d: GhostBatchNorm1d, nn.BatchNorm2d: GhostBatchNorm2d}.get(type(module))
    if ghost_class is not None:
        ghost = ghost_class(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        ghost.weight, ghost.bias = module.weight, module.bias
        ghost.running_mean, ghost.running_var = module.running_mean, module.running_var
        ghost.num_batches_tracked = module.num_batches_tracked
        ghost.groups = max(1, local_batch // bn_batch)
        return ghost.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, convert_to_ghost_batchnorm(child, local_batch, bn_batch))
    return module


# ---------------------------------------------------------------------------------------
# Data sources: an image folder, or the synthetic toy world. Each item is (PIL RGB, target).
# ---------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def to_rgb(image):
    """Any PIL mode (L, P, RGBA, CMYK, I;16, ...) -> RGB; transparency composited on gray."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.uint8(255 * array / max(array.max(), 1)))
    if image.mode == "P" or "A" in image.mode:
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
        image.alpha_composite(rgba)
    return image.convert("RGB")


def upscale_to(image, min_side):
    """Upscale so the shorter side is at least `min_side` (tiny images never raise)."""
    scale = min_side / min(image.size)
    if scale <= 1:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.BICUBIC)


class ImageFolderSource(torch.utils.data.Dataset):
    """All images under `root` (recursively; `root/train` if it exists). Labels unused.

    An unreadable file is warned about once and replaced by the next readable one; more than 1%
    distinct unreadable files abort (UnreadableImages). target = {"path": path relative to root}.
    With `min_side`, JPEGs decode at 1/2, 1/4 or 1/8 scale (PIL draft) while the shorter side stays
    >= min_side / sqrt(0.2 * 3/4), so MoCo v2's smallest crop keeps min_side pixels a side.
    """

    def __init__(self, root, min_side=0):
        if not os.path.isdir(root):
            raise SystemExit(f"error: --data {root}: no such directory")
        if os.path.isdir(os.path.join(root, "train")):
            root = os.path.join(root, "train")
        self.root, self.min_side = root, min_side
        self.draft_side = math.ceil(min_side / math.sqrt(0.2 * 3 / 4))
        self.paths = sorted(
            os.path.relpath(os.path.join(folder, name), root)
            for folder, _, names in os.walk(root, followlinks=True) for name in names
            if name.lower().endswith(IMAGE_EXTENSIONS))
        if not self.paths:
            raise SystemExit(f"error: --data {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        # A flag per file in shared memory: the DataLoader workers (forked anew each epoch) all write
        # here, so a bad file is skipped quietly by every later worker and epoch; check_unreadable ORs
        # the flags over ranks at epoch ends. The 1% rule counts these distinct files.
        self.unreadable = torch.zeros(len(self.paths), dtype=torch.uint8).share_memory_()

    def __len__(self):
        return len(self.paths)

    def load(self, index):
        with open(os.path.join(self.root, self.paths[index]), "rb") as f:
            image = Image.open(f)
            if self.min_side:
                image.draft(None, (self.draft_side, self.draft_side))  # a no-op for other formats
            image.load()
        return upscale_to(to_rgb(image), self.min_side)

    def __getitem__(self, index):
        for attempt in range(len(self.paths)):
            i = (index + attempt) % len(self.paths)
            if self.unreadable[i]:  # found unreadable before, by any worker, epoch or rank
                continue
            try:
                return self.load(i), {"path": self.paths[i]}
            except (OSError, ValueError, SyntaxError) as error:  # what PIL raises on bad files
                self.unreadable[i] = 1
                print(f"warning: skipping unreadable image {os.path.join(self.root, self.paths[i])}: {error}",
                      file=sys.stderr, flush=True)
                check_unreadable(self)
        raise UnreadableImages(f"error: no readable image under {self.root}")


class UnreadableImages(Exception):
    """Keeps one line: from a worker it comes as UnreadableImages("Caught ... Traceback ... error: ...")."""

    def __init__(self, message):
        line = message.strip().splitlines()[-1]
        super().__init__(line[line.find("error: "):])


def unreadable_limit(n):
    """The 1% rule stops a run on a broken dataset. A small folder may keep a few bad files, skipped with a
    warning: up to 10, and fewer than half of it (11 images with one empty file train)."""
    return max(0.01 * n, min(10, (n - 1) // 2))


def check_unreadable(source, device=None):
    """The unreadable-file rule (unreadable_limit); with a device (epoch ends) first OR the flags over ranks,
    which see different files."""
    if not isinstance(source, ImageFolderSource):
        return
    if device is not None and world_size() > 1:
        flags = source.unreadable.to(device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        source.unreadable.copy_(flags.cpu())
    if (count := int(source.unreadable.sum())) > unreadable_limit(len(source)):
        raise UnreadableImages(f"error: {count} of {len(source)} images under {source.root} are unreadable (over 1%, "
                               f"and over the {int(min(10, (len(source) - 1) // 2))} a small folder may skip)")


TOY_CATEGORIES = ("circle", "square", "triangle", "star", "ring", "cross", "ellipse", "diamond")


def _shape_mask(name, u, v):
    """Inside-test of a unit shape; u, v are rotated coordinates in [-1, 1]."""
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    if name == "circle":
        return rho <= 1
    if name == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8
    if name == "triangle":
        return (abs(u) <= 0.5 * (v + 1)) & (v <= 0.8)
    if name == "star":
        return rho <= 0.55 + 0.4 * np.cos(5 * phi)
    if name == "ring":
        return (rho <= 1) & (rho >= 0.55)
    if name == "cross":
        return ((abs(u) <= 0.3) | (abs(v) <= 0.3)) & (np.maximum(abs(u), abs(v)) <= 1)
    if name == "ellipse":
        return u ** 2 + (v / 0.55) ** 2 <= 1
    return abs(u) + abs(v) <= 1  # diamond


class ToyWorld(torch.utils.data.Dataset):
    """The synthetic toy world (spec/toy_world.md): textured background + 1-4 shapes.

    Item i is a pure function of (seed, split, i). target = {"boxes" (n, 4) xyxy float pixels
    of the visible extent, "labels" (n,) in 1..8, "masks" (n, H, W) uint8 visible parts,
    "mask": PIL 'L' union foreground (ground-truth saliency)}.
    """

    def __init__(self, num_images=5000, image_size=256, split="train", seed=0):
        self.num_images, self.image_size, self.seed = num_images, image_size, seed
        self.split_id = {"train": 0, "val": 1}[split]  # disjoint random streams per split

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.split_id, index])
        h, w = (rng.uniform(0.75, 1.0, size=2) * self.image_size).astype(int)
        coarse = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
        image = np.asarray(coarse.resize((w, h), Image.BILINEAR), dtype=np.float32)
        xs, ys = np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)
        if rng.random() < 0.5:  # stripes at a random angle and period: sin(a x + b y), separably
            angle, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
            a, b = np.float32(2 * np.pi / period * np.cos(angle)), np.float32(2 * np.pi / period * np.sin(angle))
            stripes = np.outer(np.cos(b * ys), np.sin(a * xs)) + np.outer(np.sin(b * ys), np.cos(a * xs))
            image += (25 * stripes[..., None]) * rng.uniform(-1, 1, 3).astype(np.float32)
        noise = np.frombuffer(rng.bytes(h * w * 3), dtype=np.uint8).reshape(h, w, 3)
        image += (noise >> 3).astype(np.float32) - 16  # uniform pixel noise in [-16, 16)
        instance = np.zeros((h, w), dtype=np.int8)  # 0 = background, i = object i (later occludes)
        labels = rng.integers(1, len(TOY_CATEGORIES) + 1, rng.integers(1, 5))
        for i, label in enumerate(labels, start=1):
            r = rng.uniform(0.05, 0.25) * min(h, w)  # diameter 10%..50% of the side
            cx, cy, theta = rng.uniform(r, w - r), rng.uniform(r, h - r), rng.uniform(0, 2 * np.pi)
            x0, x1, y0, y1 = int(cx - r), int(np.ceil(cx + r)) + 1, int(cy - r), int(np.ceil(cy + r)) + 1
            dx, dy = (xs[None, x0:x1] - cx) / r, (ys[y0:y1, None] - cy) / r
            u, v = dx * np.cos(theta) + dy * np.sin(theta), dy * np.cos(theta) - dx * np.sin(theta)
            inside = _shape_mask(TOY_CATEGORIES[label - 1], u, v)
            colour = rng.uniform(0, 255, 3)
            fill = np.broadcast_to(colour, inside.shape + (3,)).copy()
            if rng.random() < 0.5:  # textured fill: stripes in a second colour
                texture = np.sin(u * rng.uniform(6, 14)) > 0
                fill[texture] = rng.uniform(0, 255, 3)
            image[y0:y1, x0:x1][inside] = fill[inside]
            instance[y0:y1, x0:x1][inside] = i
        masks, boxes, kept = [], [], []
        for i, label in enumerate(labels, start=1):
            mask = instance == i
            if mask.sum() < 4:  # fully occluded
                continue
            ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
            boxes.append([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1])
            masks.append(mask)
            kept.append(label)
        image = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(kept, dtype=torch.int64),
                  "masks": torch.from_numpy(np.stack(masks).astype(np.uint8)) if masks
                  else torch.zeros((0, h, w), dtype=torch.uint8),
                  "mask": Image.fromarray(np.uint8(255 * (instance > 0)))}
        return image, target


def open_source(data, synthetic_images, synthetic_size, min_side=0):
    """`--data synthetic` -> ToyWorld, else an ImageFolderSource. Fails before any worker starts."""
    if data == "synthetic":
        return ToyWorld(synthetic_images, synthetic_size)
    return ImageFolderSource(data, min_side)


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
            raise SystemExit(f"error: --coco {annotations}: not a COCO annotation file ({type(error).__name__}: {error})")
        if not os.path.isdir(images):
            raise SystemExit(f"error: --coco {images}: no such directory")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        with open(os.path.join(self.root, self.images[index]["file_name"]), "rb") as f:
            image = to_rgb(Image.open(f))
        objects = torch.tensor(self.objects[self.images[index]["id"]], dtype=torch.float32).reshape(-1, 5)
        return image, {"boxes": torchvision.ops.box_convert(objects[:, :4], "xywh", "xyxy"), "labels": objects[:, 4].long()}


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


# ---------------------------------------------------------------------------------------
# MoCo v2's photometric augmentation, batched on the training device; --bench-loader
# ---------------------------------------------------------------------------------------

# Loaders return uint8 views and colour parameters drawn with the crops (draw_colour) from the worker random
# stream main() reseeds from (--seed, epoch, rank) each epoch: reruns and resumes replay them; nothing is saved.
# NOTE: MoCo v2 blurs with PIL's GaussianBlur(radius=sigma): three "extended box" passes whose variance is
# sigma^2 in exact arithmetic, each rounded to uint8. Ours is a float Gaussian of 13 taps (3 sigma at
# sigma 2.0). On a 255 impulse their spreads (the response's std) are 0.494 / 0.971 / 2.034 px (PIL) and
# 0.464 / 1.000 / 1.988 px (ours) at sigma 0.5 / 1 / 2: within 7%, the rest is PIL's rounding
# (test_blur_spread_matches_pil_on_an_impulse).
BLUR_TAPS = 13


def draw_colour(n, generator=None):
    """n views' parameters as RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], 0.8), RandomGrayscale(0.2), RandomApply(
    [blur sigma U(0.1, 2)], 0.5) draw them -> (n, 12): jitter on, 4 factors, op at position 0..3, gray on, blur on, sigma."""
    u, order = torch.rand(n, 8, generator=generator), torch.rand(n, 4, generator=generator).argsort(1)  # order: uniform
    return torch.cat([(u[:, :1] < 0.8).float(), 0.6 + 0.8 * u[:, 1:4], 0.2 * u[:, 4:5] - 0.1, order.float(),
                      (u[:, 5:6] < 0.2).float(), (u[:, 6:7] < 0.5).float(), 0.1 + 1.9 * u[:, 7:8]], dim=1)


def adjust(x, op, factor):
    """torchvision v2's adjust_<op> on floats in [0, 1], a factor per sample: x (n, ..., 3, H, W),
    factor (n,). The images of a sample share factor and contrast mean (DetCo's 9 patches)."""
    f = factor.view(-1, *[1] * (x.dim() - 1))
    if op == "hue":  # HSV hue rotation: RGB = V - C clamp(min(k, 4 - k), 0, 1), k = (5, 3, 1) + 6 H mod 6
        (r, g, b), value = x.split(1, dim=-3), x.amax(-3, keepdim=True)
        chroma = value - x.amin(-3, keepdim=True)
        safe = torch.where(chroma > 0, chroma, 1.0)
        hue = torch.where(value == r, (g - b) / safe, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
        k = (x.new_tensor([5.0, 3.0, 1.0])[:, None, None] + hue + 6 * f) % 6  # hue in sixths of a turn
        return value - chroma * torch.minimum(k, 4 - k).clamp(0, 1)
    gray = 0.0 if op == "brightness" else (x * x.new_tensor([0.2989, 0.587, 0.114])[:, None, None]).sum(-3, keepdim=True)
    toward = gray.mean(dim=tuple(range(1, x.dim())), keepdim=True) if op == "contrast" else gray
    return (f * x + (1 - f) * toward).clamp(0, 1)  # grayscale = saturation 0


def gaussian_blur(x, sigma):
    """torchvision's gaussian_blur (BLUR_TAPS taps, reflect padding), a sigma per image: x (m, 3, H, W)."""
    taps = torch.arange(BLUR_TAPS, device=x.device, dtype=x.dtype) - BLUR_TAPS // 2
    kernel = torch.softmax(-0.5 * (taps / sigma[:, None]) ** 2, dim=1).repeat_interleave(3, 0)  # (3m, 13)
    y = F.pad(x.reshape(1, -1, *x.shape[-2:]), [BLUR_TAPS // 2] * 4, mode="reflect")  # (1, 3m, H + 12, W + 12)
    y = F.conv2d(y, kernel[:, None, None, :], groups=len(kernel))  # separable: along rows, then columns
    return F.conv2d(y, kernel[:, None, :, None], groups=len(kernel)).reshape(x.shape)


def photometric(x, colour):
    """MoCo v2's colour part, then ImageNet normalisation: x (n, ..., 3, H, W) uint8, colour (n, 12)
    from draw_colour -> float32. Jitter ops in each sample's order, then grayscale, then blur."""
    with torch.autocast(x.device.type, enabled=False):  # fp32: bf16 would round colours by up to 1/256
        x, on, order = x.float() / 255, colour.cpu() > 0.5, colour[:, 5:9].cpu()  # flags on the host
        steps = [(on[:, 0] & (order[:, p] == op), name, colour[:, 1 + op]) for p in range(4)
                 for op, name in enumerate(("brightness", "contrast", "saturation", "hue"))]
        for chosen, name, factor in steps + [(on[:, 9], "saturation", torch.zeros_like(colour[:, 0]))]:
            i = torch.nonzero(chosen)[:, 0].to(x.device)
            if len(i):
                x[i] = adjust(x[i], name, factor[i].float())
        i = torch.nonzero(on[:, 10])[:, 0].to(x.device)
        if len(i):  # every image of a sample (DetCo: its 9 patches) with the sample's sigma
            images = x[i]
            sigma = colour[i, 11].float().repeat_interleave(images[0].numel() // images.shape[-3:].numel())
            x[i] = gaussian_blur(images.flatten(0, -4), sigma).view(images.shape)  # (m, 3, H, W) inside
        return (x - x.new_tensor(IMAGENET_MEAN)[:, None, None]) / x.new_tensor(IMAGENET_STD)[:, None, None]


def bench_loader(dataset, n):
    """--bench-loader N: CPU time per item of the loader (decode + geometry), one process, one thread."""
    torch.set_num_threads(1)
    dataset[0]  # first-call costs (imports, caches) are not per item
    start = time.process_time()
    for index in range(n):
        dataset[index % len(dataset)]
    print(f"{type(dataset).__name__}: {n} items, loader {1000 * (time.process_time() - start) / n:.2f} ms/item", flush=True)
# ---------------------------------------------------------------------------------------
# Resuming: a safe reader, ranks that agree, the recipe check, interrupts
# ---------------------------------------------------------------------------------------

# What MAY differ between a checkpoint's args and the command that resumes it (a list of what may, so
# that a new flag is part of the recipe until someone decides otherwise): loader processes, logging,
# paths, bf16 on a GPU or fp32 on a CPU, the memory format, the process count (the batch is global),
# values derived at start, how a loss is evaluated when the value is the same (dupr.py --patch-chunk).
# --epochs may grow (resume_epoch).
NOT_RECIPE = ("workers", "print_freq", "output_dir", "resume", "preview", "amp", "world_size", "rank", "is_main",
              "lr_actual", "epochs", "patch_chunk", "channels_last")


def checkpoint_path(args):
    return os.path.join(args.output_dir, "checkpoint.pth") if args.resume in ("auto", "none") else args.resume


def article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def read_checkpoint(path, method):
    """torch.load(weights_only=True) of a `method` checkpoint, or one line saying what the file is not."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        what = "a directory" if os.path.isdir(path) else "empty (0 bytes)" if os.path.isfile(path) else None
        raise SystemExit(f"error: {path}: " + (f"{what}, not {article(method)} checkpoint" if what else "no such file"))
    try:
        with warnings.catch_warnings(action="ignore"):  # torch's notice on the pickle protocol of foreign files
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only met a global (code, a class) or no pickle at all
        try:  # a plain pickle fails on its protocol before its globals: list its opcodes (runs nothing)
            with open(path, "rb") as f:
                code = "GLOBAL" in str(error) or any("GLOBAL" in op.name for op, _, _ in pickletools.genops(f))
        except ValueError:  # not a pickle
            code = False
        raise SystemExit(f"error: {path}: " + ("refused: contains code objects, not only tensors (nothing was "
                                               "run)" if code else "truncated or not a torch file")) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError):  # a cut zip, text, another format
        raise SystemExit(f"error: {path}: truncated or not a torch file") from None
    if not (isinstance(checkpoint, dict) and checkpoint.get("method") == method and "args" in checkpoint):
        held = (f"{article(checkpoint['method'])} checkpoint" if isinstance(checkpoint, dict) and "method" in checkpoint
                else f"a state_dict of {len(checkpoint)} entries, like backbone.pth" if isinstance(checkpoint, dict)
                else "a bare tensor" if torch.is_tensor(checkpoint) else f"a {type(checkpoint).__name__}")
        raise SystemExit(f"error: {path}: not {article(method)} checkpoint (it holds {held}); "
                         "use another --output-dir, or --resume none to start over")
    return checkpoint


def stop(message):
    """Stop before training, on every rank; the first process of each node says why."""
    raise SystemExit(message if int(os.environ.get("LOCAL_RANK", 0)) == 0 else 1)


def agreed_checkpoint(method, args):
    """The checkpoint to resume from (None: start afresh), the same on every rank, or every rank stops.

    NOTE: every rank reads its own --output-dir and the ranks all-gather what they found (host,
    sha256 of the file), rather than rank 0 loading and broadcasting: with a shared directory (the
    usual case) this is the torch.load every rank does anyway, and a node whose local disk lacks
    the file is named in one line instead of being sent state it never wrote (only rank 0 saves).
    """
    path, checkpoint, found = checkpoint_path(args), None, None
    seen = f"no {path}"
    if args.resume != "none" and (args.resume != "auto" or os.path.exists(path)):
        try:
            checkpoint = read_checkpoint(path, method)
            with open(path, "rb") as f:
                found = hashlib.file_digest(f, "sha256").hexdigest()[:12]
            unit = "epoch" if "epoch" in checkpoint else "iteration"  # detect_finetune.py counts iterations
            seen = f"{path} ({checkpoint[unit]} {unit}s done, sha256 {found})"
        except SystemExit as error:
            found = seen = str(error)
    views = [(socket.gethostname(), found, seen)] * (dist.get_world_size() if dist.is_initialized() else 1)
    if len(views) > 1:  # a few strings per rank, once, before training
        dist.all_gather_object(views, views[0])
    if len({found for _, found, _ in views}) > 1:
        groups = {}  # what the ranks found -> [(rank, host, what they see)]
        for rank, (host, found, seen) in enumerate(views):
            groups.setdefault(found, []).append((rank, host, seen))
        stop("error: the ranks do not resume from the same checkpoint: " + "; ".join(
            f"rank {', '.join(str(r) for r, _, _ in group)} ({', '.join(sorted({h for _, h, _ in group}))}): "
            + group[0][2].removeprefix("error: ") for group in groups.values()) + "; use an --output-dir on a "
            "filesystem all nodes share, or copy the checkpoint to every node (or --resume none on all)")
    if checkpoint is None and found:
        stop(found)
    return checkpoint


def resume_epoch(checkpoint, args):
    """The epoch to continue with. One line and stop if the command line changes the checkpoint's
    recipe; more --epochs extend the run (the cosine schedule is re-spread over the new total)."""
    saved, current, path = checkpoint["args"], vars(args), checkpoint_path(args)
    show = lambda value: " ".join(map(str, value)) if isinstance(value, list) else value
    differ = [name for name in saved if name in current and name not in NOT_RECIPE and saved[name] != current[name]]
    differ += ["epochs"] if args.epochs < saved["epochs"] else []  # fewer epochs would jump along the cosine
    if differ:
        stop(f"error: {path} was trained with another recipe: " + ", ".join(
            f"--{name.replace('_', '-')} {show(saved[name])} (checkpoint) vs {show(current[name])} (command line)"
            for name in differ) + "; use another --output-dir, or --resume none to start over")
    done, epochs = checkpoint["epoch"], args.epochs
    extend = f"; --epochs {saved['epochs']} -> {epochs}: the cosine schedule is re-spread over {epochs} epochs"
    if args.is_main and done == epochs:
        print(f"nothing to do: {done} of {epochs} epochs done", flush=True)
    elif args.is_main:  # progress lines count epochs from 1: the next one to train is epoch done + 1
        print(f"resumed from {path}: {done} of {epochs} epochs done{extend if epochs > saved['epochs'] else ''}; "
              f"continuing with epoch {done + 1}", flush=True)
    return done


def raise_interrupt(signum, frame):
    """SIGINT and SIGTERM handler (Ctrl-C; a scheduler, torchrun): a KeyboardInterrupt, which
    `stop_interrupted` turns into one line. Loader workers that got the same signal may be dead before
    the loader shuts down: torch's SIGCHLD check would raise then, so it is replaced first (by a no-op:
    Python reports a pending signal whose handler became SIG_DFL as a race)."""
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    raise KeyboardInterrupt


def stop_interrupted(epoch, args):
    """Ctrl-C or SIGTERM while training `epoch`: one line from the main process, exit 1, no traceback."""
    path = os.path.join(args.output_dir, "checkpoint.pth")  # what this run has saved, if anything
    done = torch.load(path, weights_only=True, mmap=True)["epoch"] if args.is_main and os.path.isfile(path) else None
    rerun = "rerun the same command" if args.resume == "auto" else "rerun with --resume auto"
    raise SystemExit(1 if not args.is_main else f"interrupted in epoch {epoch + 1}; " + (  # 1-based, as progress lines
        f"checkpoint has {done} epochs done; {rerun} to resume" if done is not None
        else f"no checkpoint in {args.output_dir} yet; {rerun} to start again"))


# ---------------------------------------------------------------------------------------
# Plumbing of every trainer: flag checks, loss.png
# ---------------------------------------------------------------------------------------


def batchnorm_groups(args):
    """The start line's account of BatchNorm: which images each BN layer's statistics pool, on both encoders."""
    local = args.batch_size // world_size()
    if args.bn_batch < local:
        return f"BatchNorm: ghost groups of {args.bn_batch} of the {local} images per process (--bn-batch)"
    more = f" (--bn-batch {args.bn_batch} is more: one group of {local})" if args.bn_batch > local else ""
    return f"BatchNorm: over the {local} images per process{more}"


def check_args(parser, args):
    """parser.error (one line, exit 2) on the first out-of-range shared flag; WORLD_SIZE is torchrun's."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = args.batch_size // world
    for wrong, message in (
            (args.lr <= 0, f"--lr {args.lr}: must be > 0"), (args.wd < 0, f"--wd {args.wd}: must be >= 0"),
            (not 0 <= args.ema < 1, f"--ema {args.ema}: the key encoder momentum m must be in [0, 1)"),
            (args.temperature <= 0, f"--temperature {args.temperature}: tau must be > 0"),
            (min(args.epochs - 1, args.print_freq - 1, args.steps, args.workers, args.preview) < 0,
             "--epochs and --print-freq must be >= 1; --steps, --workers and --preview >= 0"),
            (args.batch_size < 1 or args.batch_size % world,
             f"--batch-size {args.batch_size}: must be > 0 and divide by the world size {world}"),
            (args.bn_batch < 2 or local > args.bn_batch and local % args.bn_batch, f"--bn-batch {args.bn_batch}: must be >= 2 and divide "
             f"the per-process batch {local} (--batch-size {args.batch_size} over {world} processes)"),
            # MomentumQueue wraps around, so any K works, but one below a step's keys is no dictionary.
            (args.queue_size < args.batch_size, f"--queue-size {args.queue_size}: K must be >= the global batch"),
            (args.image_size < 32, f"--image-size {args.image_size}: must be >= 32, one cell of the stride-32 map")):
        if wrong:
            parser.error(message)


PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324", "#000075",
           "#808000", "#469990", "#800000", "#000000")  # distinct on white, in this order
FRACTIONS = ("pasted", "no_mask", "no_overlap", "box_iou")  # data statistics the trainers log: 0..1, not losses


def font(size=13):
    """Pillow's scalable default font (Pillow >= 10.1 with FreeType), else its bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError, ImportError):
        return ImageFont.load_default()


def plot_log(log_path, png_path, width=960, height=660):
    """loss.png from log.jsonl's progress rows, against the step (epoch * steps + iteration + 1): the loss
    terms (top) and the accuracies with the data fractions (bottom, 0..1). The first K / batch steps score
    against the queue's random initial keys (accuracy near 1, a low loss): they are shaded and, where
    later steps exist, not drawn, so that the queue filling up does not look like divergence. PIL only."""
    with open(log_path) as f:
        rows = list(map(json.loads, f))
    start = next((row["args"] for row in rows if row.get("event") == "start"), {})
    rows = [row for row in rows if "iteration" in row]
    filling = start.get("queue_size", 0) / max(start.get("batch_size", 1), 1)  # steps until the queue holds real keys
    not_terms = ("epoch", "iteration", "steps", "lr", "img_per_s", "data_time", "step_time", "memory_mb", "eta_s", "elapsed_s")
    names = [name for name, value in (rows or [{}])[0].items() if isinstance(value, float) and name not in not_terms]
    steps = [row["epoch"] * row["steps"] + row["iteration"] + 1 for row in rows] or [0]
    image, (left, right), text = Image.new("RGB", (width, height), "white"), (80, width - 180), font()
    draw = ImageDraw.Draw(image)
    x_of = lambda step: left + (right - left) * (step - steps[0]) / max(steps[-1] - steps[0], 1)
    panels = ([n for n in names if not n.startswith("acc") and n not in FRACTIONS],
              [n for n in names if n.startswith("acc") or n in FRACTIONS])
    for p, series in enumerate(panels):
        top, bottom = 30 + p * height // 2, (p + 1) * height // 2 - 40
        later = [row for step, row in zip(steps, rows) if step > filling] or rows
        values = [row[n] for row in later for n in series if math.isfinite(row.get(n, math.nan))]
        lo, hi = (0.0, 1.0) if p or not values else (min(values), max(values) + 1e-6)
        y_of = lambda v: bottom - (bottom - top) * (min(max(v, lo), hi) - lo) / (hi - lo)  # clipped to the panel
        hidden = filling >= steps[0] and steps[-1] > filling  # the filling steps' points are left out
        if filling >= steps[0]:
            draw.rectangle((left, top, min(x_of(filling), right), bottom), fill="#e8e8e8")
            draw.text((left + 4, top + 4), "queue filling: random keys" + (" (not drawn)" if hidden else ""),
                      fill="gray", font=text)
        draw.rectangle((left, top, right, bottom), outline="black")
        draw.text((left, top - 20), ("loss terms" if not p else "accuracy and data fractions (0 to 1)")
                  + " against the training step", fill="black", font=text)
        for k in range(5):  # ticks: values on the left
            y = top + (bottom - top) * k / 4
            draw.line((left - 4, y, left, y), fill="black")
            draw.text((4, y - 7), f"{hi - (hi - lo) * k / 4:.3g}", fill="black", font=text)
        for step in sorted({round(steps[0] + (steps[-1] - steps[0]) * k / 4) for k in range(5)}):  # steps below
            draw.line((x_of(step), bottom, x_of(step), bottom + 4), fill="black")
            draw.text((x_of(step) - 10, bottom + 6), str(step), fill="black", font=text)
        for i, name in enumerate(series):
            points = [(x_of(step), y_of(row[name])) for step, row in zip(steps, rows)
                      if math.isfinite(row.get(name, math.nan)) and not (hidden and step <= filling)]
            colour = PALETTE[i % len(PALETTE)]
            if points:  # a lone point draws a dot
                draw.ellipse((points[-1][0] - 2, points[-1][1] - 2, points[-1][0] + 2, points[-1][1] + 2), fill=colour)
                draw.line(points + points[-1:], fill=colour, width=2)
            draw.text((right + 10, top + 16 * i), name, fill=colour, font=text)
    image.save(png_path)
