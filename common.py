"""What the four trainers share, and nothing else, in this order:

- `ResNetTrunk` (torchvision's ResNet minus avgpool/fc -> conv2_x..conv5_x, torchvision's keys) and
  `roi_align_boxes` (torchvision RoIAlign, boxes in input-image pixels).
- MoCo's machinery: `concat_all_gather`, `MomentumQueue`, `ema_update`, `shuffled_key_forward`
  (shuffle BN, MoCo sec. 3.3), ghost BatchNorm (`convert_to_ghost_batchnorm`: statistics over
  groups of --bn-batch samples, as the papers' per-GPU BN).
- MoCo v2's colour augmentation on the training device: `draw_colour` (loader), `photometric` (forward).
- Data sources, each item (PIL RGB, target): `ImageFolderSource` (ImageNet `train/` aware, unreadable
  files skipped under a limit), `ToyWorld` (the built-in synthetic dataset); `bench_loader`.
- Run safety: `read_torch_file` (the one reader of torch files: `read_checkpoint`, `read_weights`),
  `agreed_checkpoint`, `resume_epoch`, interrupts, `check_args`, `plot_log` (loss.png).
- Run health (docs/logs.md): `collapse_signals` and `collapse_warning`, the k-NN monitor `knn_monitor`.
No paper's choice is made here: a method passes its choices in (e.g. how many images share one
colour draw); changing this file changes all four trainers alike.
"""
import functools
import hashlib
import json
import math
import os
import pickletools
import re
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

# --- ResNet trunk and RoIAlign ---


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
        self.channels, self.strides = [width, 2 * width, 4 * width, 8 * width], [4, 8, 16, 32]  # c2..c5

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
    """RoIAlign one box per row of `boxes` (N, 4) xyxy in input-image pixels -> (N, C, S, S). Box i is pooled
    from image `batch_index[i]` (default: image i). aligned=True shifts by half a pixel so that a box [0, W]
    covers exactly the feature map (Detectron2's convention). sampling_ratio: bilinear samples per bin side;
    0 = adaptive, ceil(bin size in cells): samples at most one cell apart (each trainer says which it uses)."""
    if batch_index is None:
        batch_index = torch.arange(len(boxes), device=boxes.device)
    rois = torch.cat([batch_index.to(boxes.dtype)[:, None], boxes], dim=1)  # (N, 5)
    # fp32 on purpose: bf16 box coordinates would be rounded by up to a pixel above 128.
    return torchvision.ops.roi_align(features.float(), rois.float(), output_size, spatial_scale=1.0 / stride,
                                     sampling_ratio=sampling_ratio, aligned=True).to(features.dtype)


# --- MoCo machinery: gather, queue, EMA, shuffle BN, ghost BN ---


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def concat_all_gather(tensor):
    """`tensor` of every process along dim 0, in rank order (rows may differ per rank); no gradient."""
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
    """Ring buffer of the K most recent keys (MoCo's dictionary), all-gathered first. `keys` starts as
    L2-normalised random vectors; both buffers are saved in checkpoints."""

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
    """Shuffle BN (MoCo sec. 3.3): `fn` on a random split of the key batch. `inputs`: tensors whose dim 0
    is the local batch (images, boxes, ...), gathered over processes and permuted with one permutation
    shared by all ranks; each rank runs `fn(*slice)` once on its slice (ghost BN in `fn` splits it into
    random groups of --bn-batch samples); only the outputs (small embeddings, dim 0 = samples) are
    gathered back and un-permuted. Returns this rank's own samples' outputs, in their order."""
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


# NOTE: ghost BatchNorm. The papers train on 8 GPUs x 32 images with per-GPU BN (no SyncBN). Ghost BN
#   normalises each of G = local batch / --bn-batch groups with its own statistics, so one GPU with
#   batch 256 (G = 8) has the 8-GPU recipe's BN statistics on both encoders. Query: sample i is in group
#   i % G, the samples DistributedSampler gives one of 8 ranks (same --seed); key: a random split, as
#   shuffle BN's. Running statistics: each group's momentum update, averaged over the G groups (the EMA
#   is linear: the mean of 8 ranks' EMAs); MoCo's DDP saves rank 0's, the same expectation with more
#   noise. docs/ghost_batchnorm.md has the argument in full. G = 1 is nn.BatchNorm.


def ghost_batch_norm(bn, x):
    """Training-mode BN of x (N, C, *) over G = bn.groups groups: rows g, g + G, ... share statistics.
    One batch_norm call on the view (N/G, G*C, *): channel g*C + c of the view is channel c of group g,
    with weight, bias and running statistics repeated G times."""
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


class GhostStatistics:
    """Ghost statistics in training for an nn.BatchNorm subclass (same parameters, buffers, state_dict keys)."""

    groups = 1  # set by convert_to_ghost_batchnorm

    def forward(self, x):
        return ghost_batch_norm(self, x) if self.training and self.groups > 1 else super().forward(x)


class GhostBatchNorm1d(GhostStatistics, nn.BatchNorm1d):
    pass


class GhostBatchNorm2d(GhostStatistics, nn.BatchNorm2d):
    pass


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


# --- MoCo v2's colour augmentation, batched on the training device ---

# Loaders return uint8 views and colour parameters drawn with the crops (draw_colour) from the worker random
# stream main() reseeds from (--seed, epoch, rank) each epoch: reruns and resumes replay them; nothing is saved.
# NOTE: MoCo v2 blurs with PIL's GaussianBlur(radius=sigma): three "extended box" passes whose variance is
# sigma^2 in exact arithmetic, each rounded to uint8. Ours is a float Gaussian of 13 taps (3 sigma at
# sigma 2.0). On a 255 impulse their spreads (the response's std) are 0.494 / 0.971 / 2.034 px (PIL) and
# 0.464 / 1.000 / 1.988 px (ours) at sigma 0.5 / 1 / 2: within 7%, the rest is PIL's rounding
# (test_blur_spread_matches_pil_on_an_impulse).
BLUR_TAPS = 13


def draw_colour(n, generator=None):
    """n views' parameters as RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], 0.8), RandomGrayscale(0.2),
    RandomApply([blur sigma U(0.1, 2)], 0.5) draw them -> (n, 12): jitter on, 4 factors, op at position
    0..3, gray on, blur on, sigma."""
    u = torch.rand(n, 8, generator=generator)
    order = torch.rand(n, 4, generator=generator).argsort(1)  # a uniform order of the 4 jitter ops
    return torch.cat([(u[:, :1] < 0.8).float(), 0.6 + 0.8 * u[:, 1:4], 0.2 * u[:, 4:5] - 0.1, order.float(),
                      (u[:, 5:6] < 0.2).float(), (u[:, 6:7] < 0.5).float(), 0.1 + 1.9 * u[:, 7:8]], dim=1)


def adjust(x, op, factor):
    """torchvision v2's adjust_<op> on floats in [0, 1], a factor per sample: x (n, ..., 3, H, W),
    factor (n,). The k images of a sample (n, k, 3, H, W) share the factor and the contrast mean."""
    f = factor.view(-1, *[1] * (x.dim() - 1))
    if op == "hue":  # HSV hue rotation: RGB = V - C clamp(min(k, 4 - k), 0, 1), k = (5, 3, 1) + 6 H mod 6
        (r, g, b), value = x.split(1, dim=-3), x.amax(-3, keepdim=True)
        chroma = value - x.amin(-3, keepdim=True)
        safe = torch.where(chroma > 0, chroma, 1.0)
        hue = torch.where(value == r, (g - b) / safe, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
        k = (x.new_tensor([5.0, 3.0, 1.0])[:, None, None] + hue + 6 * f) % 6  # hue in sixths of a turn
        return value - chroma * torch.minimum(k, 4 - k).clamp(0, 1)
    luma = x.new_tensor([0.2989, 0.587, 0.114])[:, None, None]
    gray = 0.0 if op == "brightness" else (x * luma).sum(-3, keepdim=True)
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
    """MoCo v2's colour part, then ImageNet normalisation: x uint8 (n, 3, H, W), or (n, k, 3, H, W) for k images
    coloured as one sample (one draw, one contrast mean, one blur sigma: the caller's choice), colour (n, 12)
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
        if len(i):  # every image of a sample with the sample's sigma
            images = x[i]
            sigma = colour[i, 11].float().repeat_interleave(images[0].numel() // images.shape[-3:].numel())
            x[i] = gaussian_blur(images.flatten(0, -4), sigma).view(images.shape)  # (m, 3, H, W) inside
        return (x - x.new_tensor(IMAGENET_MEAN)[:, None, None]) / x.new_tensor(IMAGENET_STD)[:, None, None]


# --- Data sources: an image folder, or the synthetic toy world. Each item is (PIL RGB, target). ---

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
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)


class ImageFolderSource(torch.utils.data.Dataset):
    """All images under `root` (recursively; `root/train` if it exists); target = {"path": relative to root}.
    An unreadable file is warned about once and replaced by the next readable one; too many abort
    (unreadable_limit). With `min_side`, JPEGs decode at 1/2, 1/4 or 1/8 scale (PIL draft) while the shorter
    side stays >= min_side / sqrt(0.2 * 3/4), so MoCo v2's smallest crop keeps min_side pixels a side."""

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
        # A flag per file in shared memory, written by every DataLoader worker (forked anew each epoch): a bad
        # file is skipped quietly later; check_unreadable ORs the flags over ranks at epoch ends.
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
    """The unreadable_limit rule; with a device (epoch ends), first OR the flags of the ranks (other files)."""
    if not isinstance(source, ImageFolderSource):
        return
    if device is not None and world_size() > 1:
        flags = source.unreadable.to(device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        source.unreadable.copy_(flags.cpu())
    if (count := int(source.unreadable.sum())) > unreadable_limit(len(source)):
        raise UnreadableImages(f"error: {count} of {len(source)} images under {source.root} are unreadable (over 1%, "
                               f"and over the {int(min(10, (len(source) - 1) // 2))} a small folder may skip)")


SHAPES = {  # inside-tests of unit shapes: u, v rotated coordinates in [-1, 1], rho, phi their polar ones
    "circle": lambda u, v, rho, phi: rho <= 1,
    "square": lambda u, v, rho, phi: np.maximum(abs(u), abs(v)) <= 0.8,
    "triangle": lambda u, v, rho, phi: (abs(u) <= 0.5 * (v + 1)) & (v <= 0.8),
    "star": lambda u, v, rho, phi: rho <= 0.55 + 0.4 * np.cos(5 * phi),
    "ring": lambda u, v, rho, phi: (rho <= 1) & (rho >= 0.55),
    "cross": lambda u, v, rho, phi: ((abs(u) <= 0.3) | (abs(v) <= 0.3)) & (np.maximum(abs(u), abs(v)) <= 1),
    "ellipse": lambda u, v, rho, phi: u ** 2 + (v / 0.55) ** 2 <= 1,
    "diamond": lambda u, v, rho, phi: abs(u) + abs(v) <= 1}
TOY_CATEGORIES = tuple(SHAPES)  # labels 1..8


class ToyWorld(torch.utils.data.Dataset):
    """The synthetic toy world: textured background + 1-4 shapes; item i is a pure function of (seed, split,
    i). target = {"boxes" (n, 4) xyxy float pixels of the visible extent, "labels" (n,) in 1..8, "masks"
    (n, H, W) uint8 visible parts, "mask": PIL 'L' union foreground (ground-truth saliency)}."""

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
            inside = SHAPES[TOY_CATEGORIES[label - 1]](u, v, np.hypot(u, v), np.arctan2(v, u))
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


def bench_loader(dataset, n):
    """--bench-loader N: CPU time per item of the loader (decode + geometry), one process, one thread."""
    torch.set_num_threads(1)
    dataset[0]  # first-call costs (imports, caches) are not per item
    start = time.process_time()
    for index in range(n):
        dataset[index % len(dataset)]
    ms = 1000 * (time.process_time() - start) / n
    print(f"{type(dataset).__name__}: {n} items, loader {ms:.2f} ms/item", flush=True)


# --- Resuming: a safe reader, ranks that agree, the recipe check, interrupts ---

# What MAY differ between a checkpoint and the command that resumes it (so a new flag is part of the recipe
# until someone decides otherwise): loader processes, logging, paths, bf16 or fp32, the memory format, the
# process count (the batch is global), values derived at start, how a loss is evaluated when its value is
# the same (dupr.py --patch-chunk); --epochs may grow (resume_epoch).
NOT_RECIPE = ("workers", "print_freq", "output_dir", "resume", "preview", "amp", "world_size", "rank", "is_main",
              "lr_actual", "epochs", "patch_chunk", "channels_last", "knn_every", "knn_data", "knn_images")


def checkpoint_path(args):
    return os.path.join(args.output_dir, "checkpoint.pth") if args.resume in ("auto", "none") else args.resume


def article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _names_objects(path):
    """Whether a plain pickle names Python objects (pickletools only lists its opcodes: nothing runs)."""
    try:
        with open(path, "rb") as f:
            return any("GLOBAL" in op.name for op, _, _ in pickletools.genops(f))
    except Exception:  # not a pickle, or a cut one
        return False


def read_torch_file(path, where):
    """The repository's one reader of torch files: torch.load(weights_only=True), or one line
    `error: WHERE: ...` saying what the file is instead. A file that names Python objects is refused."""
    what = ("no such file" if not os.path.exists(path) else "a directory, not a torch file" if os.path.isdir(path)
            else "an empty file (0 bytes)" if os.path.getsize(path) == 0 else None)
    if what:
        raise SystemExit(f"error: {where}: {what}")
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        with warnings.catch_warnings(action="ignore"):  # torch's notice on the pickle protocol of foreign files
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # every way a file can fail to be tensors: say which one it is
        named = re.search(r"GLOBAL (\S+)", str(error))
        # a plain pickle fails on its protocol before torch sees its globals: list its opcodes
        if named or head[:1] == b"\x80" and _names_objects(path):
            raise SystemExit(f"error: {where}: refused (weights_only=True): it contains Python objects"
                             f"{f' ({named.group(1)})' if named else ''}, not only tensors; nothing was run") from None
        what = ("a truncated or damaged torch file (its zip cannot be read)" if head == b"PK\x03\x04"  # torch.save's
                else "a plain Python pickle or a truncated legacy torch file" if head[:1] == b"\x80"
                else "not a torch file (neither a zip archive nor a pickle)")
        raise SystemExit(f"error: {where}: {what}") from None


def read_checkpoint(path, method):
    """A `method` checkpoint (read_torch_file), or one line saying what the file holds instead."""
    checkpoint = read_torch_file(path, path)
    if not (isinstance(checkpoint, dict) and checkpoint.get("method") == method and "args" in checkpoint):
        held = (f"{article(checkpoint['method'])} checkpoint" if isinstance(checkpoint, dict) and "method" in checkpoint
                else f"a state_dict of {len(checkpoint)} entries, like backbone.pth" if isinstance(checkpoint, dict)
                else "a bare tensor" if torch.is_tensor(checkpoint) else f"a {type(checkpoint).__name__}")
        raise SystemExit(f"error: {path}: not {article(method)} checkpoint (it holds {held}); "
                         "use another --output-dir, or --resume none to start over")
    return checkpoint


RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3),
                 "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}  # residual blocks in layer1..layer4


def resnet_arch(keys):
    """The torchvision ResNet that state_dict keys come from (blocks per stage, basic or bottleneck), or None."""
    blocks = tuple(1 + max((int(k.split(".")[1]) for k in keys if k.startswith(f"layer{i}.")), default=-1)
                   for i in range(1, 5))
    bottleneck = any(k.startswith("layer") and ".conv3." in k for k in keys)
    return next((name for name, counts in RESNET_BLOCKS.items()
                 if counts == blocks and bottleneck == (name not in ("resnet18", "resnet34"))), None)


def read_weights(path, flag):
    """Pretrained weights from any file a user may hold -> (state_dict in torchvision ResNet keys, with InsLoc's
    fpn.* / box_head.* kept and fc.* dropped; the ResNet they are, or None). Accepted: backbone.pth, a trainer's
    checkpoint.pth (its query encoder), a torchvision state_dict, MoCo's checkpoints (module.encoder_q.)."""
    state = read_torch_file(path, f"{flag} {path}")
    if torch.is_tensor(state):
        raise SystemExit(f"error: {flag} {path}: holds a single tensor, not a state dict of named weights")
    if not isinstance(state, dict) or not any(torch.is_tensor(v) or isinstance(v, dict) for v in state.values()):
        raise SystemExit(f"error: {flag} {path}: holds a {type(state).__name__} without tensors, "
                         "not a state dict of named weights")
    for wrapper in ("model", "state_dict"):  # this repository's checkpoint.pth, MoCo's official checkpoints
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    prefixes = (("module.encoder_q.", ""), ("encoder_q.backbone.", ""), ("encoder_q.fpn.", "fpn."),
                ("encoder_q.box_head.", "box_head."))
    if any(key.startswith(old) for key in state for old, _ in prefixes):  # contrastive: the query encoder only
        state = {new + key[len(old):]: value for key, value in state.items()
                 for old, new in prefixes if key.startswith(old)}
    state = {key: value for key, value in state.items() if not key.startswith("fc.") and torch.is_tensor(value)}
    return state, resnet_arch(state)


def stop(message):
    """Stop before training, on every rank; the first process of each node says why."""
    raise SystemExit(message if int(os.environ.get("LOCAL_RANK", 0)) == 0 else 1)


def agreed_checkpoint(method, args):
    """The checkpoint to resume from (None: start afresh), the same on every rank, or every rank stops.
    NOTE: each rank reads its own --output-dir and the ranks all-gather what they found (host, sha256),
    rather than rank 0 broadcasting: a node whose disk lacks the file is named instead of being sent
    state it never wrote (only rank 0 saves)."""
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
    """SIGINT and SIGTERM handler: a KeyboardInterrupt, which `stop_interrupted` turns into one line. Loader
    workers that got the signal may die before the loader shuts down, so torch's SIGCHLD check (it would
    raise) becomes a no-op first (not SIG_DFL: Python reports a pending signal whose handler became it)."""
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


# --- Run health: collapse signals and their warning, the k-NN monitor (docs/logs.md) ---

# NOTE: thresholds from the first 60 steps of --tiny runs (docs/logs.md): the collapsed InsLoc-FPN (--head-lr-scale 1)
# is below 0.003 from step 12 and at 0.0016-0.002 from step 20; the lowest embedding of the other runs stays above
# 0.0058 (DetCo's local res4/res5, whose terms sit at chance at --tiny). A step counts when any embedding is below.
COLLAPSED_STD, COLLAPSED_STEPS = 0.003, 20


@torch.no_grad()
def collapse_signals(embeddings):
    """{name: z} of L2-normalised query embeddings, z (N, D), or (N, P, D) for P per image (DUPR's patches) ->
    {std_<name>: std over the batch's N * P rows, per dimension, averaged over the D dimensions (1/sqrt(D) for
    spread-out rows, 0.088 at D = 128; 0 when collapsed), cos_<name>: mean cosine between rows of different images
    (near 0 when spread out, 1 when collapsed)}, on this process's batch; nothing for fewer than 2 images."""
    signals = {}
    for name, z in embeddings.items():
        z = z.detach().float()
        z = z[:, None] if z.dim() == 2 else z  # (N, P, D)
        N, P = z.shape[:2]
        if N < 2:  # no two images (DUPR: fewer than two overlapping pairs): no signal this step
            continue
        per_image = z.sum(1)  # (N, D)
        # sum of z_a . z_b over rows of different images = |sum of all rows|^2 - sum over images |image's sum|^2
        between = per_image.sum(0).square().sum() - per_image.square().sum()
        signals[f"std_{name}"] = z.flatten(0, 1).std(dim=0).mean()
        signals[f"cos_{name}"] = between / (N * (N - 1) * P * P)
    return signals


def collapse_warning(terms, args):
    """The warning line, once per start of the command (None otherwise), when an embedding's std_ signal has stayed
    below COLLAPSED_STD for COLLAPSED_STEPS training steps in a row (steps, not log rows: --print-freq does not move
    it). The run goes on. The count is kept in args.collapse (a dict: never saved in checkpoints or logs)."""
    low = {name: value for name, value in terms.items() if name.startswith("std_") and value < COLLAPSED_STD}
    state = vars(args).setdefault("collapse", {"steps": 0, "warned": False})
    state["steps"] = state["steps"] + 1 if low else 0
    if state["warned"] or state["steps"] < COLLAPSED_STEPS:
        return None
    state["warned"] = True
    line = (f"warning: the query embeddings look collapsed: {', '.join(f'{n} {v:.4f}' for n, v in low.items())} "
            f"(std over the batch; below {COLLAPSED_STD} for {COLLAPSED_STEPS} steps in a row; spread-out: 0.088). "
            "Training goes on; docs/logs.md (collapse) says what usually helps")
    if getattr(args, "is_main", True):
        print(line, file=sys.stderr, flush=True)
    return line


def add_knn_arguments(parser):
    """The k-NN monitor's flags, the same in the four trainers; not part of the recipe (NOT_RECIPE)."""
    parser.add_argument("--knn-every", type=int, default=0, metavar="E",
                        help="every E epochs (and after the last), the weighted k-NN top-1 (k 20, T 0.07) of the "
                             "query backbone's pooled features; 0 = off. Labels are used here only")
    parser.add_argument("--knn-data", default=None, metavar="DIR",
                        help="labelled images for it: a folder with train/ and val/ class folders (ImageNet), or "
                             "'synthetic' (toy world, label: largest object); None: --data")
    parser.add_argument("--knn-images", type=int, nargs=2, default=[10000, 5000], metavar=("TRAIN", "VAL"),
                        help="images in its fixed subsets (seed 0): TRAIN to vote, VAL to score")


class LabelledImages(torch.utils.data.Dataset):
    """The k-NN monitor's images: (3, size, size) uint8 centre crop (shorter side resized to size * 8/7, as ImageNet
    evaluation), label. A folder: its class folder's index in `classes` (sorted names -> 0, 1, ...; a class
    missing from it gets len(classes): never predicted). The toy world: the largest object's category (1..8;
    0 without objects)."""

    def __init__(self, source, size, classes=None):
        self.source, self.classes = source, classes
        self.view = torchvision.transforms.Compose([torchvision.transforms.Resize(round(size * 8 / 7)),
                                                    torchvision.transforms.CenterCrop(size)])

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        image, target = self.source[index]
        if "path" in target:
            label = self.classes.get(target["path"].split(os.sep)[0], len(self.classes))
        else:
            label = int(target["labels"][target["masks"].sum((1, 2)).argmax()]) if len(target["labels"]) else 0
        return torchvision.transforms.functional.pil_to_tensor(self.view(image)), label


@functools.lru_cache(maxsize=1)
def knn_sets(data, train_images, val_images, size):
    """The fixed subsets (seed 0, whatever --seed) of --knn-data's train and val images, listed once per process."""
    if data == "synthetic":
        return [LabelledImages(ToyWorld(n, size * 8 // 7, split), size)
                for n, split in ((train_images, "train"), (val_images, "val"))]
    sets, classes = [], None
    for n, split in ((train_images, "train"), (val_images, "val")):
        source = ImageFolderSource(os.path.join(data, split), min_side=size)
        if not all(os.sep in path for path in source.paths):
            raise SystemExit(f"error: --knn-data {data}: {split}/ has images outside class folders; labels are "
                             f"the folder names ({split}/CLASS/IMAGE, ImageNet's layout)")
        classes = classes or {name: i for i, name in  # train's class folders, for val too
                              enumerate(sorted({path.split(os.sep)[0] for path in source.paths}))}
        order = torch.randperm(len(source), generator=torch.Generator().manual_seed(0))[:n].tolist()
        sets.append(torch.utils.data.Subset(LabelledImages(source, size, classes), order))
    return sets


@torch.no_grad()
def pooled_features(backbone, dataset, args):
    """(n, C) L2-normalised average-pooled res5 features of every image of `dataset` and (n,) labels, rows in
    rank order. Each rank extracts every world-th image; eval mode: BN uses (and keeps) its running statistics."""
    world, rank = world_size(), dist.get_rank() if world_size() > 1 else 0
    part = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(part, batch_size=max(1, args.batch_size // world), num_workers=args.workers,
                                         generator=torch.Generator())  # no draw from the training's random stream
    features, labels, training = [], [], backbone.training
    backbone.eval()
    mean, std = torch.tensor(IMAGENET_MEAN, device=args.device), torch.tensor(IMAGENET_STD, device=args.device)
    for images, label in loader:
        x = (images.to(args.device).float() / 255 - mean[:, None, None]) / std[:, None, None]
        x = x.to(memory_format=torch.channels_last) if args.channels_last else x
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.amp):
            c5 = backbone(x)[-1]  # (b, C, h, w)
        features.append(F.normalize(c5.float().mean(dim=(2, 3)), dim=1))
        labels.append(label.to(args.device))
    backbone.train(training)
    return concat_all_gather(torch.cat(features)), concat_all_gather(torch.cat(labels))


def knn_top1(train_features, train_labels, val_features, val_labels, k=20, T=0.07):
    """Weighted k-NN ("Unsupervised Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018,
    arXiv:1805.01978, sec. 3.4; k 20 as DINO's eval_knn): each val image's k most cosine-similar train images vote
    for their label with weight exp(similarity / T); top-1 = share of val images whose heaviest label is theirs."""
    classes, correct = int(max(train_labels.max(), val_labels.max())) + 1, 0
    for start in range(0, len(val_features), 1024):  # (1024, n_train) similarities at a time
        similarity, nearest = (val_features[start:start + 1024] @ train_features.t()).topk(
            min(k, len(train_features)), dim=1)  # (b, k)
        votes = torch.zeros(len(nearest), classes, device=nearest.device)
        votes.scatter_add_(1, train_labels[nearest], (similarity / T).exp())
        correct += int((votes.argmax(1) == val_labels[start:start + 1024]).sum())
    return correct / len(val_features)


def knn_monitor(backbone, epoch, args):
    """--knn-every E: after every E-th epoch and the last, on every rank: {"knn_top1", "knn_s"} (seconds it took),
    printed on the main process; else {}. Touches neither the weights nor any random stream the training uses."""
    if not args.knn_every or (epoch + 1) % args.knn_every and epoch + 1 < args.epochs:
        return {}
    start = time.time()
    train, val = knn_sets(args.knn_data or args.data, *args.knn_images, args.image_size)
    top1 = knn_top1(*pooled_features(backbone, train, args), *pooled_features(backbone, val, args))
    seconds = time.time() - start
    if args.is_main:
        print(f"k-NN top-1 {top1:.3f} (k 20, T 0.07; {len(train)} train, {len(val)} val images of "
              f"{args.knn_data or args.data}; world size {args.world_size}; {seconds:.1f} s)", flush=True)
    return {"knn_top1": top1, "knn_s": seconds}


# --- Plumbing of every trainer: flag checks, loss.png ---


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
            (args.bn_batch < 2 or local > args.bn_batch and local % args.bn_batch,
             f"--bn-batch {args.bn_batch}: must be >= 2 and divide "
             f"the per-process batch {local} (--batch-size {args.batch_size} over {world} processes)"),
            # MomentumQueue wraps around, so any K works, but one below a step's keys is no dictionary.
            (args.queue_size < args.batch_size, f"--queue-size {args.queue_size}: K must be >= the global batch"),
            (args.image_size < 32, f"--image-size {args.image_size}: must be >= 32, one cell of the stride-32 map"),
            (args.knn_every < 0 or min(args.knn_images) < world,
             f"--knn-every {args.knn_every} --knn-images {' '.join(map(str, args.knn_images))}: must be >= 0, and "
             f">= {world} (an image per process)")):
        if wrong:
            parser.error(message)
    knn_data = args.knn_data or args.data
    folders = [os.path.join(knn_data, split) for split in ("train", "val")]
    if args.knn_every and knn_data != "synthetic" and not all(
            os.path.isdir(folder) and any(entry.is_dir() for entry in os.scandir(folder)) for folder in folders):
        parser.error(f"--knn-data {knn_data}: needs train/ and val/ class folders (ImageNet's layout)")


PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324", "#000075",
           "#808000", "#469990", "#800000", "#000000")  # distinct on white, in this order
FRACTIONS = ("pasted", "no_mask", "no_overlap", "box_iou")  # data statistics the trainers log: 0..1, not losses
SIGNALS = ("std_", "cos_")  # collapse_signals: 0..1, a panel of their own; std drawn x 10 (0.088 -> 0.88)


def font(size=13):
    """Pillow's scalable default font (Pillow >= 10.1 with FreeType), else its bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError, ImportError):
        return ImageFont.load_default()


def plot_log(log_path, png_path, width=960, panel_height=330):
    """loss.png from log.jsonl's progress rows against the step (epoch * steps + iteration + 1): loss terms (top);
    accuracies, data fractions and the k-NN top-1 of epoch ends (0..1); the collapse signals, if logged (0..1, std
    x 10). The first K / batch steps score against the queue's random initial keys (accuracy near 1, a low loss):
    shaded and, where later steps exist, not drawn."""
    with open(log_path) as f:
        rows = list(map(json.loads, f))
    start = next((row["args"] for row in rows if row.get("event") == "start"), {})
    knn = [row for row in rows if "knn_top1" in row]  # epoch ends
    rows = [row for row in rows if "iteration" in row]
    filling = start.get("queue_size", 0) / max(start.get("batch_size", 1), 1)  # steps until the queue holds real keys
    not_terms = ("epoch", "iteration", "steps", "lr", "img_per_s", "data_time", "step_time", "memory_mb", "eta_s",
                 "elapsed_s")
    names = [name for name, value in (rows or [{}])[0].items() if isinstance(value, float) and name not in not_terms]
    steps = [row["epoch"] * row["steps"] + row["iteration"] + 1 for row in rows] or [0]
    series = dict(zip(names, [list(zip(steps, rows))] * len(names)))  # name -> [(step, row)]
    series.update({"knn_top1": [((row["epoch"] + 1) * rows[0]["steps"], row) for row in knn]} if knn and rows else {})
    panels = [("loss terms", [n for n in names if not n.startswith(("acc",) + SIGNALS) and n not in FRACTIONS]),
              ("accuracy, data fractions and k-NN top-1 (0 to 1)",
               [n for n in series if n.startswith(("acc", "knn")) or n in FRACTIONS]),
              ("collapse signals: cos_ and std_ x 10 (0 to 1; collapsed: cos 1, std 0)",
               [n for n in names if n.startswith(SIGNALS)])]
    panels = [panel for p, panel in enumerate(panels) if p < 2 or panel[1]]
    height, scale = panel_height * len(panels), lambda name: 10.0 if name.startswith("std_") else 1.0
    image, (left, right), text = Image.new("RGB", (width, height), "white"), (80, width - 180), font()
    draw = ImageDraw.Draw(image)
    x_of = lambda step: left + (right - left) * (step - steps[0]) / max(steps[-1] - steps[0], 1)
    for p, (title, shown) in enumerate(panels):
        top, bottom = 30 + p * panel_height, (p + 1) * panel_height - 40
        later = [row for step, row in zip(steps, rows) if step > filling] or rows
        values = [row[n] for row in later for n in shown if math.isfinite(row.get(n, math.nan))]
        lo, hi = (0.0, 1.0) if p or not values else (min(values), max(values) + 1e-6)
        y_of = lambda v: bottom - (bottom - top) * (min(max(v, lo), hi) - lo) / (hi - lo)  # clipped to the panel
        hidden = filling >= steps[0] and steps[-1] > filling  # the filling steps' points are left out
        if filling >= steps[0]:
            draw.rectangle((left, top, min(x_of(filling), right), bottom), fill="#e8e8e8")
            draw.text((left + 4, top + 4), "queue filling: random keys" + (" (not drawn)" if hidden else ""),
                      fill="gray", font=text)
        draw.rectangle((left, top, right, bottom), outline="black")
        draw.text((left, top - 20), title + " against the training step", fill="black", font=text)
        for k in range(5):  # ticks: values on the left
            y = top + (bottom - top) * k / 4
            draw.line((left - 4, y, left, y), fill="black")
            draw.text((4, y - 7), f"{hi - (hi - lo) * k / 4:.3g}", fill="black", font=text)
        for step in sorted({round(steps[0] + (steps[-1] - steps[0]) * k / 4) for k in range(5)}):  # steps below
            draw.line((x_of(step), bottom, x_of(step), bottom + 4), fill="black")
            draw.text((x_of(step) - 10, bottom + 6), str(step), fill="black", font=text)
        keys = list(dict.fromkeys(name.removeprefix("std_").removeprefix("cos_") for name in shown))
        for i, name in enumerate(shown):
            points = [(x_of(step), y_of(scale(name) * row[name])) for step, row in series[name]
                      if math.isfinite(row.get(name, math.nan)) and not (hidden and step <= filling)]
            # an embedding's std_ (thin) and cos_ (thick) share its colour: DetCo's 16 signals need 8
            colour = PALETTE[keys.index(name.removeprefix("std_").removeprefix("cos_")) % len(PALETTE)]
            for x, y in points if name == "knn_top1" else points[-1:]:  # a lone point draws a dot
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
            if points:
                draw.line(points + points[-1:], fill=colour, width=1 if scale(name) > 1 else 2)
            draw.text((right + 10, top + 16 * i), name + (" x10" if scale(name) > 1 else ""), fill=colour, font=text)
    image.save(png_path)
