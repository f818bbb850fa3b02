"""DiLo: Distilling Localization for Self-Supervised Representation Learning.

Zhao, Wu, Lau, Lin, AAAI 2021, arXiv:2004.06638. Also this repository's MoCo v2 baseline (Improved
Baselines with Momentum Contrastive Learning, Chen, Fan, Girshick, He, arXiv:2003.04297):
`--paste-prob 0` is exactly MoCo v2.

Idea: contrastive models look at backgrounds as much as at objects (paper "Diagnosing
Self-Supervised Models", Fig. 2). DiLo estimates a foreground saliency mask per image and,
with probability p per view, copies the foreground onto another background before the
usual MoCo v2 augmentations ("Copy-and-paste for Background Augmentation"), so the two
views of an image share the object but not always its background.

    python dilo.py --tiny                                    # toy world, CPU, 1,248 steps: the loss falls
    torchrun --nproc_per_node=8 dilo.py --data /imagenet --saliency /imagenet_saliency
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 \\
        --nproc_per_node=8 dilo.py --data /imagenet --saliency /imagenet_saliency
    python dilo.py --paste-prob 0 --data /imagenet           # the MoCo v2 baseline
    torchrun --nproc_per_node=8 dilo.py --make-saliency --data /imagenet \\
        --saliency-out /imagenet_saliency                    # RBD masks, once
    python -m tools.diagnose runs/dilo/backbone.pth --data /imagenet  # neighbours + gradients (Fig. 2, 5)

Recipe (defaults): MoCo v2, ResNet-50, tau 0.2, K 65536, m 0.999, lr 0.03 per 256,
cosine, 200 epochs, MLP head 2048-2048-128; copy-paste p = 0.3 (Table 2b), gray
backgrounds (Table 2c), mixed blending (Table 2d).
Expected (paper Table 3, MoCo v2 rows, ImageNet linear top-1): 67.5 -> 67.9 with RBD masks,
69.2 with BASNet masks (--saliency DIR).
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
from PIL import Image, ImageDraw, ImageFilter

from common import (IMAGENET_MEAN, IMAGENET_STD, ImageFolderSource, MomentumQueue, ResNetTrunk, UnreadableImages,
                    add_knn_arguments, agreed_checkpoint, batchnorm_groups, bench_loader, check_args, check_unreadable,
                    collapse_signals, collapse_warning, convert_to_ghost_batchnorm, draw_colour, ema_update, font,
                    knn_monitor, open_source, photometric, plot_log, raise_interrupt, resume_epoch,
                    shuffled_key_forward, stop_interrupted, to_rgb, world_size)

# --- Arguments ---

# NOTE: --tiny is a CPU run in which MoCo v2's loss falls and its accuracy rises above chance:
# 8 epochs of 5,000 toy images, 1,248 steps (measured: docs/tiny_runs.md). With the paper's
# m 0.999 the key encoder averages over about 1,000 steps; in 300 steps (dupr.py's tiny run)
# MoCo v2's loss does not move; m 0.99 moves it sooner by a fresh-versus-stale-key shortcut,
# and a higher lr collapses the head. K 96 holds the last 3 steps' keys: never an image's own
# older key, and the random starting queue is gone after 3 steps. lr and m stay the paper's.
# `--tiny --epochs 1 --steps 10` is a 10-step smoke run.
METHOD = "dilo"  # the name its checkpoints carry
TINY = dict(data="synthetic", arch="resnet18", image_size=64, batch_size=32, queue_size=96, bn_batch=8,
            epochs=8, workers=2, print_freq=20)
TINY_IMAGES = 5000


# NOTE: the paper's ablations (Table 2: 60.6 -> 62.8 with RBD) use MoCo v1 (tau 0.07, step
# schedule); we follow the spec's MoCo v2 base, so Table 3's MoCo v2 rows are this recipe's.
def get_args(argv=None):
    parser = argparse.ArgumentParser(description="DiLo / MoCo v2 pretraining",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="synthetic", help="image folder (ImageNet layout aware) or 'synthetic'")
    parser.add_argument("--arch", default="resnet50", help="torchvision ResNet: resnet18/34/50/101/152")
    parser.add_argument("--epochs", type=int, default=200, help="epochs; the cosine lr schedule spans them")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch over all processes")
    parser.add_argument("--lr", type=float, default=0.03, help="base lr per 256 images (scaled linearly)")
    parser.add_argument("--wd", type=float, default=1e-4, help="weight decay")
    parser.add_argument("--workers", type=int, default=8, help="data loader workers per process")
    parser.add_argument("--image-size", type=int, default=224, help="view size, pixels")
    parser.add_argument("--queue-size", type=int, default=65536, help="K, keys in the queue")
    parser.add_argument("--temperature", type=float, default=0.2, help="tau of InfoNCE")
    parser.add_argument("--ema", type=float, default=0.999, help="m, key encoder momentum")
    parser.add_argument("--bn-batch", type=int, default=32,
                        help="samples per BatchNorm group, both encoders (per-GPU batch of the paper)")
    parser.add_argument("--output-dir", default="runs/dilo", help="checkpoint.pth, backbone.pth, log.jsonl, loss.png")
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
    # DiLo ("Copy-and-paste for Background Augmentation", Table 2)
    parser.add_argument("--paste-prob", type=float, default=0.3,
                        help="p, probability of copy-paste per view (0 = MoCo v2)")
    parser.add_argument("--background", default="gray", help="gray | dataset | folder:PATH")
    parser.add_argument("--blend", default="mix", choices=["none", "gaussian", "mix"], help="paste blending")
    parser.add_argument("--saliency", default="gt", help="gt (toy world masks) | DIR of mask PNGs | rbd")
    parser.add_argument("--make-saliency", action="store_true",
                        help="write RBD masks of every --data image into --saliency-out, then exit (resumable)")
    parser.add_argument("--saliency-out", default=None,
                        help="DIR for --make-saliency: one mask PNG per image, same relative path")
    args = parser.parse_args(argv)
    if args.tiny:  # the tiny recipe replaces defaults only: explicit flags still win
        parser.set_defaults(**TINY)
        args = parser.parse_args(argv)
    check_args(parser, args)
    if not 0 <= args.paste_prob <= 1:
        parser.error(f"--paste-prob {args.paste_prob}: a probability, in [0, 1]")
    return args


# --- Data: copy-paste, MoCo v2 augmentation (the saliency masks: RBD, after the method) ---


def moco_v2_box(image):
    """MoCo v2's RandomResizedCrop(scale (0.2, 1), ratio (3/4, 4/3)) window of a PIL image, as
    (left, top, right, bottom). Drawn before the paste, so a pasting view composites only its window."""
    top, left, height, width = T.RandomResizedCrop.get_params(image, (0.2, 1.0), (3 / 4, 4 / 3))
    return left, top, left + width, top + height


def moco_v2_view(window, size):
    """The rest of MoCo v2's geometry: a (3, h, w) uint8 crop window resized to size x size, then a
    flip with p 0.5. Its colour part runs batched on the training device (common.photometric)."""
    view = TF.resize(window, [size, size], antialias=True)
    return TF.hflip(view) if torch.rand(()) < 0.5 else view


BLUR_MARGIN = 24  # px: PIL's GaussianBlur(radius=5) is 3 box passes that reach 15 px (15 is the least exact margin)


def copy_paste(image, mask, background, soft, box=None):
    """`image` over `background` (all the same size) with alpha = mask / 255: the released loader
    blends with the raw saliency values. soft=True: Gaussian blending, alpha blurred first (sigma 5 px).
    box=(left, top, right, bottom): only that window of the composite, pixel-identical to cropping the
    whole composite (test_window_paste_equals_whole_paste), at a fraction of the cost."""
    left, top, right, bottom = box = box or (0, 0, *image.size)
    if soft:  # blur the window plus a margin (clipped at the image border, where PIL extends the edge pixels)
        outer = (max(left - BLUR_MARGIN, 0), max(top - BLUR_MARGIN, 0),
                 min(right + BLUR_MARGIN, image.width), min(bottom + BLUR_MARGIN, image.height))
        blurred = mask.crop(outer).filter(ImageFilter.GaussianBlur(radius=5))
        alpha = blurred.crop((left - outer[0], top - outer[1], right - outer[0], bottom - outer[1]))
    else:
        alpha = mask.crop(box)
    return Image.composite(image.crop(box), background.crop(box), alpha)


class CopyPasteTwoViews(torch.utils.data.Dataset):
    """Item -> (view_q, view_k (3, S, S) uint8, pasted (2,) bool, has_mask, colour (2, 12)): two MoCo v2
    views, each pasted with p, and their photometric parameters (common.draw_colour)."""

    def __init__(self, source, args):
        self.source, self.args = source, args
        self.backgrounds = None
        if args.background.startswith("folder:"):
            self.backgrounds = ImageFolderSource(args.background[len("folder:"):])
        elif args.background not in ("gray", "dataset"):
            raise SystemExit(f"error: --background {args.background}: expected gray, dataset or folder:PATH")
        if args.saliency == "rbd" and args.paste_prob > 0:  # estimated in the loader (large data: --make-saliency)
            self.source = RBDMasks(source)
        if args.saliency == "gt" and args.data != "synthetic" and args.paste_prob > 0:
            raise SystemExit(f"error: --data {args.data} has no ground-truth masks (--saliency gt): pass --saliency "
                             "DIR of mask PNGs (write them once with --make-saliency --saliency-out DIR) "
                             "or --saliency rbd")
        if args.saliency not in ("gt", "rbd") and args.paste_prob > 0 and (
                args.data == "synthetic" or not os.path.isdir(args.saliency)):
            raise SystemExit(f"error: --saliency {args.saliency}: expected a directory of masks named like the files "
                             "of --data FOLDER (--data synthetic has no files: use --saliency gt)")

    def __len__(self):
        return len(self.source)

    def mask_path(self, target):  # --saliency DIR
        return os.path.join(self.args.saliency, os.path.splitext(target["path"])[0] + ".png")

    def load_mask(self, target, size):
        """The image's saliency mask as PIL 'L' of `size`, or None if it has none."""
        if self.args.saliency in ("gt", "rbd"):
            mask = target["mask"]
        else:
            if not os.path.exists(self.mask_path(target)):
                return None
            mask = Image.open(self.mask_path(target)).convert("L")
        if mask.size != size:  # masks precomputed at another resolution
            mask = mask.resize(size, Image.BILINEAR)
        return mask if mask.getextrema()[1] >= 128 else None  # empty: no pixel is foreground at 0.5

    def background(self, size):
        if self.args.background == "gray":
            gray = int(torch.randint(0, 256, ()))
            return Image.new("RGB", size, (gray, gray, gray))
        if self.backgrounds is not None:
            image, _ = self.backgrounds[int(torch.randint(len(self.backgrounds), ()))]
            return image.resize(size, Image.BILINEAR)
        return self.low_saliency_crop(size)

    def low_saliency_crop(self, size):
        """Paper's "ImageNet backgrounds": the least salient of 8 random half-size windows of
        another dataset image, stretched over the whole image."""
        image, target = self.source[int(torch.randint(len(self.source), ()))]
        mask = self.load_mask(target, image.size)
        side = min(image.size) // 2
        corners = torch.rand(8, 2) * torch.tensor([image.width - side, image.height - side])
        if mask is None:
            x, y = corners[0].int().tolist()
        else:
            saliency = np.asarray(mask, dtype=np.float32)
            x, y = min(corners.int().tolist(), key=lambda c: saliency[c[1]:c[1] + side, c[0]:c[0] + side].mean())
        return image.crop((x, y, x + side, y + side)).resize(size, Image.BILINEAR)

    def paste_or_not(self, image, pixels, mask, coin, box):
        """-> the view's crop window, (3, h, w) uint8, of the image pasted onto a new background or of
        `pixels` (the image as a tensor), and whether it was pasted."""
        if mask is None or not coin:
            left, top, right, bottom = box
            return pixels[:, top:bottom, left:right], False
        soft = self.args.blend == "gaussian" or (self.args.blend == "mix" and float(torch.rand(())) < 0.5)
        return TF.pil_to_tensor(copy_paste(image, mask, self.background(image.size), soft, box)), True

    def sample(self, index):
        """-> image, mask (None: none, or not decoded as no view pastes), has_mask,
        [(window, box, pasted)] * 2 (each view's crop window of its source image), views."""
        image, target = self.source[index]
        coins = [float(torch.rand(())) < self.args.paste_prob for _ in range(2)]  # p per view, independently
        # NOTE: an image without a mask, or with an empty one, is used unpasted and counted (has_mask); a
        # --saliency DIR mask is decoded only when a view pastes, so an empty file counts only then.
        lazy = self.args.saliency not in ("gt", "rbd") and not any(coins)  # then a mask file is not decoded
        mask = None if lazy or self.args.paste_prob == 0 else self.load_mask(target, image.size)
        has_mask = os.path.exists(self.mask_path(target)) if lazy else mask is not None
        pixels = TF.pil_to_tensor(image)  # (3, H, W) uint8, shared by the unpasted views
        sources, views = [], []
        for coin in coins:
            box = moco_v2_box(image)
            window, was = self.paste_or_not(image, pixels, mask, coin, box)
            sources.append((window, box, was))
            views.append(moco_v2_view(window, self.args.image_size))  # (3, S, S) uint8
        return image, mask, has_mask, sources, views

    def __getitem__(self, index):
        _, _, has_mask, sources, views = self.sample(index)
        return views[0], views[1], torch.tensor([was for _, _, was in sources]), has_mask, draw_colour(2)


# --- Model: MoCo v2 encoder = ResNet + MLP head, key encoder, queue ---


class Encoder(nn.Module):
    def __init__(self, arch, dim=128):
        super().__init__()
        self.backbone = ResNetTrunk(arch)
        C = self.backbone.channels[-1]
        self.head = nn.Sequential(nn.Linear(C, C), nn.ReLU(inplace=True), nn.Linear(C, dim))

    def forward(self, x):
        c5 = self.backbone(x)[-1]  # (N, C, h, w)
        return F.normalize(self.head(c5.mean(dim=(2, 3))), dim=1)  # (N, 128)


class DiLo(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        encoder = Encoder(args.arch)
        # Ghost BN (common.py): BN statistics over groups of --bn-batch samples, on both encoders
        self.encoder_q = convert_to_ghost_batchnorm(encoder, args.batch_size // world_size(), args.bn_batch)
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        self.queue = MomentumQueue(args.queue_size)

    def forward(self, im_q, im_k, pasted, has_mask, colour=None):
        """colour (N, 2, 12): MoCo v2's colour part for the uint8 views; None: float inputs, ready."""
        if colour is not None:
            im_q, im_k = photometric(im_q, colour[:, 0]), photometric(im_k, colour[:, 1])
        q = self.encoder_q(im_q)  # (N, 128)
        ema_update(self.encoder_k, self.encoder_q, self.args.ema)
        k = shuffled_key_forward(self.encoder_k, (im_k,))  # (N, 128)
        loss, acc = info_nce(q, k, self.queue.keys.clone(), self.args.temperature)  # enqueue writes in place
        self.queue.enqueue(k)
        return loss, {"loss": loss.detach(), "acc": acc, **collapse_signals({"q": q}),  # std_q, cos_q: docs/logs.md
                      "pasted": pasted.float().mean(),  # and what the data loader did
                      "no_mask": 1 - has_mask.float().mean() if self.args.paste_prob > 0 else torch.zeros(())}


# --- Loss ---


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


# --- Preview: --preview N ---


# Same as dupr.py
def to_picture(tensor, size):
    """A normalised (3, H, W) view back to a PIL image."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    array = ((tensor * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array).resize((size, size))


def write_preview(dataset, args, cell=128):
    """Per sample: original | mask | view-1 source | view-2 source | view 1 | view 2; a source is the
    original with the view's crop window (outlined) as the view sees it, pasted or not."""
    columns = ["original", "mask", "source q", "source k", "view q", "view k"]
    sheet = Image.new("RGB", (cell * len(columns), 16 + cell * args.preview + 34), "white")  # + legend
    draw, text = ImageDraw.Draw(sheet), font(12)
    for c, name in enumerate(columns):
        draw.text((c * cell + 4, 2), name, fill="black", font=text)
    for row in range(args.preview):
        image, mask, has_mask, sources, views = dataset.sample(row)
        mask = (mask.convert("RGB") if mask is not None
                else Image.new("RGB", image.size, "red" if not has_mask else "gray"))
        cells = [image, mask]
        for window, box, _ in sources:
            source = image.copy()
            source.paste(TF.to_pil_image(window), box[:2])
            ImageDraw.Draw(source).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline="yellow", width=2)
            cells.append(source)
        views = photometric(torch.stack(views), draw_colour(2))  # as the training step colours them
        cells = [c.resize((cell, cell)) for c in cells] + [to_picture(v, cell) for v in views]
        for c, picture in enumerate(cells):
            sheet.paste(picture, (c * cell, 16 + row * cell))
        for c, (_, _, was_pasted) in enumerate(sources):
            draw.text((4 + (2 + c) * cell, 20 + row * cell), "pasted" if was_pasted else "original", fill="yellow",
                      font=text)
    draw.text((4, 17 + cell * args.preview), "mask: saliency (red: none); source: the original with the view's crop\n"
              "window (yellow), pasted or not", fill="black", font=text)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "preview.png")
    sheet.save(path)
    print(f"wrote {path}")


# --- Saliency: RBD ---
# Zhu et al., "Saliency Optimization from Robust Background Detection", CVPR 2014, after the authors'
# reference code; numpy only, one image at a time. The masks CopyPasteTwoViews pastes with: --saliency rbd
# (on the fly) or --make-saliency (once).

RBD_MAX_SIDE = 400  # NOTE: larger images are estimated at this size (ImageNet is ~400x350)


def rgb_to_lab(rgb):
    """(H, W, 3) uint8 sRGB -> (H, W, 3) float32 CIE Lab (D65), L in [0, 100]."""
    linear = np.arange(256, dtype=np.float32) / 255
    linear = np.where(linear > 0.04045, ((linear + 0.055) / 1.055) ** 2.4, linear / 12.92)[rgb]
    to_xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = linear @ (to_xyz / np.array([[0.95047], [1.0], [1.08883]])).T.astype(np.float32)
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def slic(lab, n_segments, compactness=20.0, iterations=10):
    """SLIC superpixels (Achanta et al. 2012): (H, W, 3) Lab -> (H, W) labels 0..N-1.

    Vectorised over a grid of equal cells: every pixel compares itself with the 9 clusters
    seeded in its own cell and the 8 around it (the original searches 2S x 2S around each
    centre: the same clusters while centres stay near their seeds), as one batched matmul.
    NOTE: no connectivity enforcement; a stray fragment keeps its cluster's label.
    """
    H, W = lab.shape[:2]
    S = math.sqrt(H * W / n_segments)  # grid step
    rows, cols = max(1, round(H / S)), max(1, round(W / S))
    sy, sx = -(-H // rows), -(-W // cols)  # cell size; the image is edge-padded to rows*sy x cols*sx
    ys, xs = np.mgrid[0:rows * sy, 0:cols * sx].astype(np.float32)
    ys, xs = np.minimum(ys, H - 1), np.minimum(xs, W - 1)
    scale = np.float32(compactness / S)  # D^2 = |dLab|^2 + (m/S)^2 |dxy|^2
    pixels = np.concatenate([lab[ys.astype(int), xs.astype(int)], scale * ys[..., None], scale * xs[..., None]], -1)
    blocks = pixels.reshape(rows, sy, cols, sx, 5).transpose(0, 2, 1, 3, 4).reshape(rows * cols, sy * sx, 5)
    inside = (np.arange(rows * sy) < H)[:, None] & (np.arange(cols * sx) < W)  # padding has weight 0
    weight = inside.reshape(rows, sy, cols, sx).transpose(0, 2, 1, 3).reshape(-1)
    r, c = np.divmod(np.arange(rows * cols), cols)
    candidates = np.stack([np.clip(r + dy, 0, rows - 1) * cols + np.clip(c + dx, 0, cols - 1)
                           for dy in (-1, 0, 1) for dx in (-1, 0, 1)], 1)  # (cells, 9) cluster ids
    labels = np.repeat(np.arange(rows * cols), sy * sx)  # start from the grid: update, then assign
    flat, centres = blocks.reshape(-1, 5), None
    for _ in range(iterations):
        counts = np.bincount(labels, weight, rows * cols)[:, None]
        sums = np.stack([np.bincount(labels, weight * flat[:, j], rows * cols) for j in range(5)], 1)
        means = (sums / np.maximum(counts, 1)).astype(np.float32)
        centres = means if centres is None else np.where(counts > 0, means, centres)  # (cells, 5)
        near = centres[candidates]  # (cells, 9, 5)
        # |p|^2 is the same for all 9 candidates of a pixel: dropped
        distance = (near ** 2).sum(-1)[:, None] - 2 * blocks @ near.transpose(0, 2, 1)  # (cells, sy*sx, 9)
        labels = np.take_along_axis(candidates, distance.argmin(-1), 1).ravel()
    labels = labels.reshape(rows, cols, sy, sx).transpose(0, 2, 1, 3).reshape(rows * sy, cols * sx)[:H, :W]
    return np.unique(labels, return_inverse=True)[1].reshape(H, W)


def all_pairs_shortest_paths(weights):
    """Floyd-Warshall on an (N, N) matrix of edge lengths (inf = no edge), vectorised over pairs."""
    distance = np.where(np.eye(len(weights), dtype=bool), 0, weights)
    for k in range(len(distance)):
        np.minimum(distance, distance[:, k, None] + distance[None, k, :], out=distance)
    return distance


def superpixel_rings(labels):
    """(H, W) labels 0..N-1 -> (N, N) bool 1-ring (4-adjacent pixels) and 2-ring, self included."""
    ring1 = np.eye(labels.max() + 1, dtype=bool)
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        ring1[a.ravel(), b.ravel()] = ring1[b.ravel(), a.ravel()] = True
    return ring1, (ring1.astype(np.float32) @ ring1.astype(np.float32)) > 0


def gaussian_weights(distance, sigma):
    """exp(-d^2 / (2 sigma^2)), 0 beyond 3 sigma (reference Dist2WeightMatrix); sigma 0 keeps d = 0 only."""
    return np.where(distance <= 3 * sigma, np.exp(-distance ** 2 / (2 * sigma ** 2 + 1e-12)), 0)


def otsu_threshold(values):
    """Otsu's threshold of values in [0, 1] over 256 bins, as MATLAB's graythresh (ties averaged)."""
    counts = np.bincount(np.round(255 * values).astype(int), minlength=256)
    omega, mu = np.cumsum(counts) / counts.sum(), np.cumsum(counts * np.arange(256)) / counts.sum()
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 where a class is empty
        between = np.nan_to_num((mu[-1] * omega - mu) ** 2 / (omega * (1 - omega)), nan=-1)  # between-class variance
    return np.flatnonzero(between == between.max()).mean() / 255 if between.max() >= 0 else 0.0


def rbd_saliency(image, sigma_spa=0.4, mu=0.1, lambda_bg=5.0):
    """RBD saliency of a PIL image -> (H, W) float32 map in [0, 1] at the image's resolution."""
    scale = min(1.0, RBD_MAX_SIDE / max(image.size))
    small = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                        Image.BILINEAR)
    lab = rgb_to_lab(np.asarray(small))
    H, W = lab.shape[:2]
    # NOTE: h*w/600 superpixels as the reference code, but at least 100 so small images get a graph
    labels = slic(lab, max(100, round(H * W / 600)), compactness=20.0)
    N, ys, xs = labels.max() + 1, *np.mgrid[0:H, 0:W]
    features = np.concatenate([lab, ys[..., None] / H, xs[..., None] / W], -1).reshape(-1, 5)  # Lab, y, x in [0, 1)
    means = np.stack([np.bincount(labels.ravel(), f, N) for f in features.T], 1) / np.bincount(labels.ravel())[:, None]
    colour, position = means[:, :3], means[:, 3:]  # (N, 3), (N, 2)
    ring1, ring2 = superpixel_rings(labels)  # (N, N) each
    # "Boundary" = superpixels touching a border band: 8 px at the reference superpixel size (~24 px).
    band = max(1, round(math.sqrt(H * W / N) / 3))
    strips = [labels[:band], labels[-band:], labels[:, :band].T, labels[:, -band:].T]  # top, bottom, left, right
    boundary = np.bincount(np.concatenate(strips, axis=None), minlength=N) > 0
    d_app, d_spa = (np.sqrt(((f[:, None] - f[None]) ** 2).sum(-1)) for f in (colour, position))  # (N, N) Lab, xy
    # NOTE: adaptive parameters as the reference's EstimateDynamicParas, not the paper's fixed ones:
    # meanMin1 / meanMin2 = mean Lab distance to the nearest 1-ring / 2-ring neighbour, meanTop = mean
    # of the largest 1% of neighbour distances.
    mean_min1, mean_min2 = (np.where(ring & ~np.eye(N, dtype=bool), d_app, np.inf).min(1).mean()
                            for ring in (ring1, ring2))
    edges = np.sort(d_app[np.triu(ring1, 1)])[::-1]
    mean_top = edges[:max(1, round(0.01 * len(edges)))].mean() if len(edges) else 0.0  # no pair: a 1-superpixel image
    sigma_geo, sigma_clr = max(5, min(10, 3 * mean_min1, mean_top / 10)), min(3 * mean_min1, 0.2 * mean_top, 20)
    # Eq. 1, soft: geodesic distances on the graph with every boundary pair linked, edges clipped by meanMin2.
    boundary_pairs = boundary[:, None] & boundary[None]
    d_geo = all_pairs_shortest_paths(np.where(ring1 | boundary_pairs, np.maximum(0, d_app - mean_min2), np.inf))
    S_geo = gaussian_weights(d_geo, sigma_geo)  # (N, N) soft "same region"
    bnd_con = S_geo[:, boundary].sum(1) / np.sqrt(S_geo.sum(1))  # Len_bnd / sqrt(Area)
    w_bg = 1 - np.exp(-bnd_con ** 2 / 2)  # eq. 2: background probability, sigma_bndCon = 1
    # Eq. 5. NOTE: sigma_spa 0.4 as the reference (paper: 0.25).
    w_ctr = (d_app * gaussian_weights(d_spa, sigma_spa)) @ w_bg
    w_fg = (w_ctr - w_ctr.min()) / (w_ctr.max() - w_ctr.min() + 1e-12)
    w_fg[w_fg < otsu_threshold(w_fg)] = 0  # NOTE: not in the paper; the reference zeroes what is below Otsu's threshold
    # Eq. 9, a linear system: min sum w_bg s^2 + sum w_fg (s - 1)^2 + sum_ij w_ij (s_i - s_j)^2.
    # NOTE: as the reference, not the paper: w_ij over 2-ring neighbours and boundary pairs (+ mu on
    # the 1-ring), lambda_bg 5, w_bg 1000 where BndCon > 3.
    w_ij = gaussian_weights(np.where(ring2 | boundary_pairs, d_app, np.inf), sigma_clr) + mu * ring1
    system = np.diag(w_ij.sum(1) + lambda_bg * np.where(bnd_con > 3, 1000, w_bg) + w_fg) - w_ij
    s = np.linalg.solve(system, w_fg)
    s = (s - s.min()) / (s.max() - s.min() + 1e-12)
    saliency = Image.fromarray(s[labels].astype(np.float32)).resize(image.size, Image.BILINEAR)
    return np.clip(np.asarray(saliency), 0, 1)


class RBDMasks(torch.utils.data.Dataset):
    """`--saliency rbd`: a source whose targets carry RBD masks estimated on the fly (small data)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        image, target = self.source[index]
        return image, {**target, "mask": Image.fromarray(np.uint8(np.round(255 * rbd_saliency(image))))}


class SaliencyJobs(torch.utils.data.Dataset):
    """Item i estimates and writes the mask of `paths[i]` -> (path, error message or "")."""

    def __init__(self, root, paths, out_dir):
        self.root, self.paths, self.out_dir = root, paths, out_dir

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        out = os.path.join(self.out_dir, os.path.splitext(path)[0] + ".png")  # the `--saliency DIR` layout
        try:
            with open(os.path.join(self.root, path), "rb") as f:
                image = Image.open(f)
                image.load()
            saliency = rbd_saliency(to_rgb(image))
        except Exception as error:  # a bad file is reported in the summary, never fatal
            return path, f"{type(error).__name__}: {error}"
        os.makedirs(os.path.dirname(out), exist_ok=True)
        temporary = f"{out}.tmp{os.getpid()}"  # an interrupted run never leaves a half-written mask
        Image.fromarray(np.uint8(np.round(255 * saliency))).save(temporary, format="PNG")
        os.replace(temporary, out)
        return path, ""


def make_saliency(args):
    """`--make-saliency`: an RBD mask per image of --data into --saliency-out; resumable.

    torchrun ranks split the paths (rank::world, no process group needed); within a process
    --workers data loader workers estimate in parallel. Masks that exist are skipped.
    """
    if args.data == "synthetic" or not args.saliency_out:
        raise SystemExit("error: --make-saliency needs --data FOLDER and --saliency-out DIR")
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    source = ImageFolderSource(args.data)
    mine = source.paths[rank::world]
    todo = [p for p in mine if not os.path.exists(os.path.join(args.saliency_out, os.path.splitext(p)[0] + ".png"))]
    print(f"rank {rank}/{world}: {len(mine)} images under {source.root}, {len(mine) - len(todo)} masks exist, "
          f"{len(todo)} to estimate into {args.saliency_out}", flush=True)
    loader = torch.utils.data.DataLoader(SaliencyJobs(source.root, todo, args.saliency_out), batch_size=None,
                                         num_workers=args.workers)
    failed, start, last_print = [], time.time(), 0.0
    for done, (path, error) in enumerate(loader, start=1):
        if error:
            failed.append(f"{path} ({error})")
        if time.time() - last_print > 10 or done == len(todo):
            last_print, rate = time.time(), done / (time.time() - start)
            print(f"rank {rank}: [{done}/{len(todo)}] {rate:.1f} img/s, eta {(len(todo) - done) / rate / 60:.1f} min, "
                  f"{len(failed)} unreadable", flush=True)
    print(f"rank {rank}: done: {len(todo) - len(failed)} masks written, {len(mine) - len(todo)} existed, "
          f"{len(failed)} unreadable" + "".join(f"\n  unreadable: {f}" for f in failed), flush=True)
    return {"written": len(todo) - len(failed), "existed": len(mine) - len(todo), "failed": failed}


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


# Same as dupr.py
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
    if args.make_saliency:
        return make_saliency(args)
    setup_distributed(args)
    source = open_source(args.data, TINY_IMAGES if args.tiny else 5000, args.image_size * 8 // 7,
                         min_side=args.image_size)
    dataset = CopyPasteTwoViews(source, args)
    if args.preview:
        return write_preview(dataset, args) if args.is_main else None
    if args.bench_loader:
        return bench_loader(dataset, args.bench_loader)
    seed_everything(args.seed)
    model = DiLo(args).to(args.device)
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
              f"backbone {count(model.encoder_q.backbone) / 1e6:.2f}M, "
              f"head {count(model.encoder_q.head) / 1e6:.2f}M params")
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
