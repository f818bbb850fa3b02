"""DetCo: Unsupervised Contrastive Learning for Object Detection.

Xie, Ding, Wang, Zhan, Xu, Sun, Li, Luo, ICCV 2021, arXiv:2102.04803 (and the first author's talk
slides). The authors never released pretraining code; every choice the paper leaves open is a NOTE
beside the code it governs.

Idea: MoCo v2 learns from one global embedding of res5, which transfers to classification
better than to detection. DetCo adds (1) Hierarchical Intermediate Contrast: a contrastive
loss at each of res2..res5, with its own heads and queues, so shallow features stay
discriminative; (2) Cross Global-Local Contrast: each image also gives two jigsaw sets of
9 local patches, and the embedding of a patch set is contrasted with the other global view
(l2g) and with the other patch set (l2l). Per level l, with weight w_l (paper Sec. 3):

    L = sum_l w_l * (L_g2g(q_g, k_g, Queue_g) + L_l2g(q_l, k_g, Queue_g) + L_l2l(q_l, k_l, Queue_l))

    python detco.py --tiny                    # toy world, CPU, 300 steps: the total loss falls
    torchrun --nproc_per_node=8 detco.py --data /imagenet
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 \\
        --nproc_per_node=8 detco.py --data /imagenet
    python detco.py --preview 8               # views, patch sets, crop boxes

Recipe (defaults): MoCo v2 base and augmentation, ResNet-50, tau 0.2, 8 queues of K 65536,
m 0.999, lr 0.03 per 256, cosine, 200 epochs (100 in the paper's ablations), level weights
0.1 0.4 0.7 1.0; jigsaw of a 255 px crop, 3 x 3 cells of 85 px, 64 px patches (at 224).
Expected (paper, slides Table 6, VOC07+12 Faster R-CNN C4, 200 epochs): AP 57.8 / AP50 82.6
/ AP75 64.2 vs MoCo v2's 57.0 / 82.4 / 63.6; ImageNet linear top-1 68.6 vs 67.5 (Table 8).
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
                    open_source, photometric, plot_log, raise_interrupt, resume_epoch, shuffled_key_forward,
                    stop_interrupted, world_size)

# --- Arguments ---

# NOTE: dupr.py's tiny recipe: one epoch of 9,600 images (300 steps) is what it takes for the total loss
#   to fall with the paper's lr and m: every g2g term falls, the local terms barely move
#   (docs/tiny_runs.md). Every queue gets 32 keys a step, so 96 keys are the last 3 steps: no queue
#   holds an image's own older keys.
METHOD = "detco"  # the name its checkpoints carry
TINY = dict(data="synthetic", arch="resnet18", image_size=64, batch_size=32, queue_size=96, bn_batch=8,
            epochs=1, workers=2, print_freq=20)
TINY_IMAGES = 9600
LEVELS = ("res2", "res3", "res4", "res5")


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="DetCo pretraining",
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
    parser.add_argument("--output-dir", default="runs/detco", help="checkpoint.pth, backbone.pth, log.jsonl, loss.png")
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
    # DetCo (Sec. 3.2, hierarchical intermediate contrast)
    # NOTE: the paper weights shallow levels less; the talk slides give no values. 0.1, 0.4, 0.7, 1.0 are
    #   those DUPR's paper states for the same four levels (its sec. 3.2.3; the papers share authors);
    #   we could not check the DetCo text (arXiv 2102.04803) for them.
    parser.add_argument("--level-weights", type=float, nargs=4, default=[0.1, 0.4, 0.7, 1.0], metavar="W",
                        help="w_l, loss weight of res2 res3 res4 res5")
    args = parser.parse_args(argv)
    if args.tiny:  # the tiny recipe replaces defaults only: explicit flags still win
        parser.set_defaults(**TINY)
        args = parser.parse_args(argv)
    check_args(parser, args)
    if min(args.level_weights) < 0 or max(args.level_weights) == 0:
        parser.error(f"--level-weights {args.level_weights}: must be >= 0, at least one > 0")
    return args


# --- Data: two global views (MoCo v2) and two jigsaw patch sets per image ---


# NOTE: jigsaw sizes. The 255 crop at scale (0.6, 1), 3 x 3 cells of 85 and 64 px patches are PIRL's
#   jigsaw (Misra, van der Maaten, CVPR 2020, arXiv 1912.01991) as PyContrast builds it
#   (RandomResizedCrop(255, scale=(0.6, 1)), then JigsawCrop(n_grid=3, img_size=255, crop_size=64)), the
#   codebase DUPR's authors took their PIRL weights from; the talk slides give no jigsaw geometry.
#   They scale with --image-size S in this one place: cell = round(85 S / 224), crop = 3 cell (the grid
#   tiles the crop exactly), patch = round(64 S / 224): 224 -> 255 / 85 / 64, 64 (--tiny) -> 72 / 24 / 18.
def local_sizes(image_size):
    """(crop, cell, patch) in pixels of the jigsaw for global views of `image_size`; 224 -> (255, 85, 64)."""
    cell = round(85 * image_size / 224)
    return 3 * cell, cell, round(64 * image_size / 224)


# NOTE: flip is drawn right after the crop (MoCo v2 flips last). Flip commutes with jitter, grayscale
#   and the symmetric blur, so views have MoCo v2's distribution; this way a view's whole geometry is
#   known before colour, for the jigsaw test and --preview.
def random_crop_and_flip(image, size, scale):
    """The geometry of a view: RandomResizedCrop to size x size, then a flip with p 0.5.

    image: (3, H, W) uint8. Returns ((3, size, size) crop, box (x0, y0, x1, y1) of the crop on `image`, flipped).
    """
    i, j, h, w = T.RandomResizedCrop.get_params(image, scale, (3 / 4, 4 / 3))
    crop = TF.resized_crop(image, i, j, h, w, [size, size], antialias=True)
    flipped = bool(torch.rand(()) < 0.5)
    return (TF.hflip(crop) if flipped else crop), (j, i, j + w, i + h), flipped


class GlobalLocalViews(torch.utils.data.Dataset):
    """Item -> (view_q, view_k (3, S, S), patches_q, patches_k (9, 3, p, p), all uint8 from the original
    image, colour (4, 12)): photometric parameters of view q, view k, patch set q, patch set k."""

    def __init__(self, source, args):
        self.source, self.size = source, args.image_size
        self.crop, self.cell, self.patch = local_sizes(args.image_size)

    def __len__(self):
        return len(self.source)

    def global_view(self, image):
        crop, box, flipped = random_crop_and_flip(image, self.size, (0.2, 1.0))
        return {"view": crop, "box": box, "flipped": flipped}

    def jigsaw(self, image):
        """A 3 x 3 jigsaw (paper Sec. 3.3, after PIRL): crop (0.6-1 of the area), grid of cells,
        a random patch x patch window per cell, the 9 windows shuffled. Slot j holds cell perm[j]."""
        crop, box, flipped = random_crop_and_flip(image, self.crop, (0.6, 1.0))
        corners = torch.arange(3) * self.cell
        # (9, 2) cell corners (y, x), row-major; then the top-left of each cell's window
        windows = torch.stack(torch.meshgrid(corners, corners, indexing="ij"), -1).reshape(9, 2)
        windows = windows + torch.randint(0, self.cell - self.patch + 1, (9, 2))
        perm = torch.randperm(9)
        p = self.patch
        patches = torch.stack([crop[:, y0:y0 + p, x0:x0 + p] for y0, x0 in windows[perm].tolist()])  # (9, 3, p, p)
        return {"patches": patches, "crop": crop, "box": box, "flipped": flipped, "windows": windows, "perm": perm}

    def sample(self, index):
        image, _ = self.source[index]
        pixels = TF.pil_to_tensor(image)  # (3, H, W) uint8, decoded once for all four crops
        return image, [self.global_view(pixels) for _ in range(2)], [self.jigsaw(pixels) for _ in range(2)]

    # NOTE: colour jitter is MoCo v2's (0.4, 0.4, 0.4, hue 0.1), shared with the other trainers. The
    #   OpenSelfSup MoCo v2 config (the codebase DetCo's authors name) had hue 0.4 until commit bc05268
    #   "fix moco v2 hue" (Sep 2020, five months before DetCo's arXiv v1) set it to MoCo v2's 0.1; which
    #   one DetCo ran is not published. The RandAugment / AutoAugment of the paper's strongest rows is
    #   not built: this is the MoCo v2-augmentation recipe. Four colour draws: view q, view k, and one
    #   per patch set, not per patch (NOTE at DetCo.forward).
    def __getitem__(self, index):
        _, views, jigsaws = self.sample(index)
        return views[0]["view"], views[1]["view"], jigsaws[0]["patches"], jigsaws[1]["patches"], draw_colour(4)


# --- Model: per level res2..res5 a global and a local head; key encoder; 8 queues ---


def mlp(in_features, hidden, dim=128):
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


class Encoder(nn.Module):
    """ResNet + global and local heads at res2..res5 (paper Fig. 2b).

    forward(images (N, 3, S, S), patches (N, 9, 3, p, p)) -> 8 embeddings (N, 128):
    global res2..res5, then local res2..res5. One backbone pass for the views, one for the patches.
    """

    def __init__(self, arch, dim=128):
        super().__init__()
        self.backbone = ResNetTrunk(arch)
        # NOTE: heads (the paper gives no widths; the authors' issue #6 asks): per level C_l, global:
        #   pool -> MLP C_l -> C_l -> 128; local: pool each patch -> concatenate the 9 vectors in the
        #   set's shuffled order -> MLP 9 C_l -> C_l -> 128. All L2-normalised. Counts print at start
        #   (ResNet-50: global 6.1M, local 50.6M, of which res5's local head alone is 38.0M).
        self.global_heads = nn.ModuleList(mlp(C, C, dim) for C in self.backbone.channels)
        self.local_heads = nn.ModuleList(mlp(9 * C, C, dim) for C in self.backbone.channels)

    def forward(self, images, patches):
        N = len(images)
        global_features = self.backbone(images)  # 4 x (N, C_l, h_l, w_l)
        # NOTE: patches go through the backbone at their own size (64 px: res5 is 2 x 2), one batch of
        #   N * 9 patches per side, so BN sees global views and patches in separate batches. The batch is
        #   slot-major (row j * N + i is image i's patch j), so that ghost BN puts image i's patches in
        #   image i's group (row % G = i % G).
        local_features = self.backbone(patches.transpose(0, 1).flatten(0, 1))  # 4 x (9 * N, C_l, h'_l, w'_l)
        g = [head(c.mean(dim=(2, 3))) for head, c in zip(self.global_heads, global_features)]  # 4 x (N, 128)
        # (9 * N, C_l) -> (N, 9 * C_l): each image's 9 patch vectors side by side, in slot order
        l = [head(c.mean(dim=(2, 3)).reshape(9, N, -1).transpose(0, 1).flatten(1))
             for head, c in zip(self.local_heads, local_features)]
        return tuple(F.normalize(e, dim=1) for e in g + l)


class DetCo(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        encoder = Encoder(args.arch)
        # Ghost BN (common.py): BN statistics over groups of --bn-batch samples, on both encoders
        self.encoder_q = convert_to_ghost_batchnorm(encoder, args.batch_size // world_size(), args.bn_batch)
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        # Queue_g of res2..res5, then Queue_l of res2..res5: the order of the embeddings.
        self.queues = nn.ModuleList(MomentumQueue(args.queue_size) for _ in range(2 * len(LEVELS)))

    def forward(self, im_q, im_k, patches_q, patches_k, colour=None):
        """colour (N, 4, 12): MoCo v2's colour part for the uint8 inputs, one draw per view and per
        patch set; None: float inputs, ready."""
        if colour is not None:
            # NOTE: colour jitter, grayscale and blur are drawn once per local set, not per patch (PIRL
            #   jitters each patch; the spec lists colour before the split). That is DetCo's choice, made
            #   here by passing each set as one (N, 9, 3, p, p) block: common.photometric gives the k = 9
            #   images of a sample one colour draw, one contrast mean (over all 9 patches, not the whole
            #   local crop) and one blur sigma. Colour runs on the training device on the cut patches, so
            #   the blur pads each patch by reflection.
            im_q, im_k, patches_q, patches_k = (photometric(x, colour[:, i]) for i, x in
                                                enumerate((im_q, im_k, patches_q, patches_k)))
        q = self.encoder_q(im_q, patches_q)  # 8 x (N, 128)
        ema_update(self.encoder_k, self.encoder_q, self.args.ema)
        # NOTE: shuffle BN: an image's global key view and its 9 key patches travel together (one
        #   permutation), so a BN group (ghost BN) is bn_batch views, or the 9 bn_batch patches of those
        #   images, as on one of the paper's GPUs.
        k = shuffled_key_forward(self.encoder_k, (im_k, patches_k))  # 8 x (N, 128)
        queues = [queue.keys.clone() for queue in self.queues]  # enqueue writes in place
        loss, terms = detco_loss(q, k, queues, self.args.level_weights, self.args.temperature)
        for queue, key in zip(self.queues, k):
            queue.enqueue(key)
        names = [f"{kind}_{level}" for kind in ("global", "local") for level in LEVELS]  # the order of q
        return loss, {**terms, **collapse_signals(dict(zip(names, q)))}  # std_*, cos_*: docs/logs.md


# --- Loss ---


# NOTE: l2g uses level l's global key and global queue; no symmetric swap of views; the level terms are
#   summed unnormalised (the weights do not sum to 1), as the paper's equation.
def detco_loss(q, k, queues, level_weights, tau):
    """Paper eq. (DetCo loss): sum_l w_l (L_g2g + L_l2g + L_l2l), 12 InfoNCE terms.

    q, k, queues: 8 entries each, global res2..res5 then local res2..res5; q, k (N, 128), queues (K, 128).
    Returns the total and a dict of every term and its positive-vs-queue accuracy.
    """
    L = len(level_weights)
    loss, terms = 0.0, {}
    for level, w in enumerate(level_weights):
        q_g, q_l, k_g, k_l = q[level], q[L + level], k[level], k[L + level]
        for name, query, key, queue in (("g2g", q_g, k_g, queues[level]),  # global query vs global key
                                        ("l2g", q_l, k_g, queues[level]),  # patch set vs the other global view
                                        ("l2l", q_l, k_l, queues[L + level])):  # patch set vs the other patch set
            term, acc = info_nce(query, key, queue, tau)
            loss = loss + w * term
            terms[f"{name}_{LEVELS[level]}"], terms[f"acc_{name}_{LEVELS[level]}"] = term.detach(), acc
    return loss, {"loss": loss.detach(), **terms}


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


# --- Preview: --preview N draws both views, both patch sets and the crop regions, then exits ---


# Same as dupr.py
def to_picture(tensor, size):
    """A normalised (3, H, W) view back to a PIL image."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    array = ((tensor * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array).resize((size, size))


def draw_regions(image, views, jigsaws, size):
    """The original at size x size with the 2 global crops and the 2 local crops, each local
    crop with its 9 patch windows (mapped back through the crop's scale and flip)."""
    picture = image.resize((size, size))
    draw, sx, sy = ImageDraw.Draw(picture), size / image.width, size / image.height
    for view, colour in zip(views, ("red", "blue")):
        x0, y0, x1, y1 = view["box"]
        draw.rectangle((x0 * sx, y0 * sy, x1 * sx, y1 * sy), outline=colour, width=2)
    for jigsaw, colour in zip(jigsaws, ("yellow", "lime")):
        x0, y0, x1, y1 = jigsaw["box"]
        draw.rectangle((x0 * sx, y0 * sy, x1 * sx, y1 * sy), outline=colour, width=2)
        side, p = jigsaw["crop"].shape[-1], jigsaw["patches"].shape[-1]
        ux, uy = (x1 - x0) / side * sx, (y1 - y0) / side * sy  # picture pixels per crop pixel
        for wy, wx in jigsaw["windows"].tolist():
            wx = side - wx - p if jigsaw["flipped"] else wx
            draw.rectangle((x0 * sx + wx * ux, y0 * sy + wy * uy, x0 * sx + (wx + p) * ux, y0 * sy + (wy + p) * uy),
                           outline=colour)
    return picture


def write_preview(dataset, args, cell=128):
    """Per sample: original with crop regions | view q | view k | patch set q | patch set k (slot order)."""
    columns = ["original: crops", "view q (red)", "view k (blue)", "patches q (yellow)", "patches k (lime)"]
    sheet = Image.new("RGB", (cell * len(columns), 16 + cell * args.preview), "white")
    draw, text = ImageDraw.Draw(sheet), font(12)
    for c, name in enumerate(columns):
        draw.text((c * cell + 4, 2), name, fill="black", font=text)
    tile = (cell - 4) // 3
    for row in range(args.preview):
        image, views, jigsaws = dataset.sample(row)
        colour, top = draw_colour(4), 16 + row * cell  # as the training step colours them
        sheet.paste(draw_regions(image, views, jigsaws, cell), (0, top))
        for c, view in enumerate(views):
            sheet.paste(to_picture(photometric(view["view"][None], colour[c:c + 1])[0], cell), ((1 + c) * cell, top))
        for c, jigsaw in enumerate(jigsaws):
            patches = photometric(jigsaw["patches"][None], colour[2 + c:3 + c])[0]  # (9, 3, p, p)
            for slot, (patch, source_cell) in enumerate(zip(patches, jigsaw["perm"].tolist())):
                x, y = (3 + c) * cell + 2 + (slot % 3) * tile, top + 2 + (slot // 3) * tile
                sheet.paste(to_picture(patch, tile - 2), (x, y))
                draw.text((x + 2, y + 1), str(source_cell), fill="yellow", font=text)  # the cell this slot came from
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
    setup_distributed(args)
    source = open_source(args.data, TINY_IMAGES if args.tiny else 5000, args.image_size * 8 // 7,
                         min_side=args.image_size)
    dataset = GlobalLocalViews(source, args)
    if args.preview:
        return write_preview(dataset, args) if args.is_main else None
    if args.bench_loader:
        return bench_loader(dataset, args.bench_loader)
    seed_everything(args.seed)
    model = DetCo(args).to(args.device)
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
              f"backbone {count(model.encoder_q.backbone) / 1e6:.2f}M params; jigsaw crop/cell/patch "
              f"{'/'.join(map(str, local_sizes(args.image_size)))} px")
        print(batchnorm_groups(args), flush=True)
        for kind, heads in (("global", model.encoder_q.global_heads), ("local", model.encoder_q.local_heads)):
            print(f"{kind} heads {sum(map(count, heads)) / 1e6:.2f}M params: "
                  + ", ".join(f"{level} {count(head):,}" for level, head in zip(LEVELS, heads)))
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
