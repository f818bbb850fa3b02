"""DiLo: Distilling Localization for Self-Supervised Representation Learning.

Zhao, Wu, Lau, Lin, AAAI 2021 (../shared/papers/dilo_paper.txt). Also this repository's
MoCo v2 baseline (Chen, Fan, Girshick, He 2020): `--paste-prob 0` is exactly MoCo v2.

Idea: contrastive models look at backgrounds as much as at objects (paper "Diagnosing
Self-Supervised Models", Fig. 2). DiLo estimates a foreground saliency mask per image and,
with probability p per view, copies the foreground onto another background before the
usual MoCo v2 augmentations ("Copy-and-paste for Background Augmentation"), so the two
views of an image share the object but not always its background.

    python dilo.py --tiny                                    # toy world, CPU, ~1 minute
    torchrun --nproc_per_node=8 dilo.py --data /imagenet --saliency /imagenet_saliency
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 \\
        --nproc_per_node=8 dilo.py --data /imagenet --saliency /imagenet_saliency
    python dilo.py --paste-prob 0 --data /imagenet           # the MoCo v2 baseline

Recipe (defaults): MoCo v2, ResNet-50, tau 0.2, K 65536, m 0.999, lr 0.03 per 256,
cosine, 200 epochs, MLP head 2048-2048-128; copy-paste p = 0.3 (Table 2b), gray
backgrounds (Table 2c), mixed blending (Table 2d).
Expected (paper Table 2, their MoCo setting): ImageNet linear 60.6 -> 62.8 with RBD masks.

NOTE: the paper's ablations use MoCo v1 (tau 0.07, step schedule); we follow the spec's
MoCo v2 base, as the paper's detection results do.
NOTE: an image without a mask, or with an empty one, is used unpasted and counted.
"""
import argparse
import copy
import json
import math
import os
import random
import resource
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image, ImageDraw, ImageFilter

from common import (IMAGENET_MEAN, IMAGENET_STD, ImageFolderSource, MomentumQueue, ResNetTrunk,
                    ema_update, open_source, shuffled_key_forward, to_rgb)

# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------

# NOTE: the tiny queue (256) is smaller than its dataset (320 images): a larger one would hold
# each image's own older keys as negatives. ema 0.99 and lr 0.3 let 50 steps show learning.
TINY = dict(data="synthetic", arch="resnet18", image_size=64, batch_size=32, queue_size=256, bn_batch=8,
            epochs=12, workers=2, lr=0.3, ema=0.99, print_freq=2)


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="DiLo / MoCo v2 pretraining", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="synthetic", help="image folder (ImageNet layout aware) or 'synthetic'")
    parser.add_argument("--arch", default="resnet50", help="torchvision ResNet: resnet18/34/50/101/152")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=256, help="global batch over all processes")
    parser.add_argument("--lr", type=float, default=0.03, help="base lr per 256 images (scaled linearly)")
    parser.add_argument("--wd", type=float, default=1e-4, help="weight decay")
    parser.add_argument("--workers", type=int, default=8, help="data loader workers per process")
    parser.add_argument("--image-size", type=int, default=224, help="view size, pixels")
    parser.add_argument("--queue-size", type=int, default=65536, help="K, keys in the queue")
    parser.add_argument("--temperature", type=float, default=0.2, help="tau of InfoNCE")
    parser.add_argument("--ema", type=float, default=0.999, help="m, key encoder momentum")
    parser.add_argument("--bn-batch", type=int, default=32, help="samples per shuffle-BN chunk (per-GPU batch of the paper)")
    parser.add_argument("--output-dir", default="runs/dilo")
    parser.add_argument("--resume", default="auto", help="'auto' (output-dir/checkpoint.pth if present), a path, or 'none'")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on for CUDA)")
    parser.add_argument("--print-freq", type=int, default=10, help="iterations between log lines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=0, help="cap on iterations per epoch (0 = full epoch)")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized recipe: " + " ".join(f"{k}={v}" for k, v in TINY.items()))
    parser.add_argument("--preview", type=int, default=0, help="write output-dir/preview.png with N samples, then exit")
    # DiLo ("Copy-and-paste for Background Augmentation", Table 2)
    parser.add_argument("--paste-prob", type=float, default=0.3, help="p, probability of copy-paste per view (0 = MoCo v2)")
    parser.add_argument("--background", default="gray", help="gray | dataset | folder:PATH")
    parser.add_argument("--blend", default="mix", choices=["none", "gaussian", "mix"], help="paste blending")
    parser.add_argument("--saliency", default="gt", help="gt (toy world masks) | DIR of mask PNGs | rbd")
    args = parser.parse_args(argv)
    if args.tiny:  # the tiny recipe replaces defaults only: explicit flags still win
        parser.set_defaults(**TINY)
        args = parser.parse_args(argv)
    return args


# ---------------------------------------------------------------------------------------
# Data: saliency masks, copy-paste, MoCo v2 augmentation
# ---------------------------------------------------------------------------------------


class RandomGaussianBlur:
    """MoCo v2's blur: PIL Gaussian blur with sigma ~ U(0.1, 2.0)."""

    def __call__(self, image):
        return image.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(()).uniform_(0.1, 2.0))))


def moco_v2_augmentation(size):
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([RandomGaussianBlur()], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def copy_paste(image, mask, background, soft):
    """Foreground of `image` (where `mask` is on) over `background`; all the same size.

    soft=False: hard paste with the mask binarised at 128. soft=True: Gaussian blending,
    the mask blurred (sigma 5 px at original resolution) and used as alpha.
    """
    if soft:
        alpha = mask.filter(ImageFilter.GaussianBlur(radius=5))
    else:
        alpha = mask.point(lambda v: 255 if v >= 128 else 0)
    return Image.composite(image, background, alpha)


class CopyPasteTwoViews(torch.utils.data.Dataset):
    """Item -> (view_q, view_k, pasted (2,), has_mask): two MoCo v2 views, each pasted with p."""

    def __init__(self, source, args):
        self.source, self.args = source, args
        self.augment = moco_v2_augmentation(args.image_size)
        self.backgrounds = None
        if args.background.startswith("folder:"):
            self.backgrounds = ImageFolderSource(args.background[len("folder:"):])
        elif args.background not in ("gray", "dataset"):
            raise SystemExit(f"error: --background {args.background}: expected gray, dataset or folder:PATH")
        if args.saliency == "rbd":
            raise SystemExit("error: --saliency rbd (the built-in RBD estimator) is not available yet; "
                             "precompute masks and pass --saliency DIR")
        if args.saliency == "gt" and args.data != "synthetic" and args.paste_prob > 0:
            raise SystemExit("error: --saliency gt needs --data synthetic; pass --saliency DIR of mask PNGs")

    def __len__(self):
        return len(self.source)

    def load_mask(self, target, size):
        """The image's saliency mask as PIL 'L' of `size`, or None if it has none."""
        if self.args.saliency == "gt":
            mask = target["mask"]
        else:
            path = os.path.join(self.args.saliency, os.path.splitext(target["path"])[0] + ".png")
            if not os.path.exists(path):
                return None
            mask = Image.open(path).convert("L")
        if mask.size != size:  # masks precomputed at another resolution
            mask = mask.resize(size, Image.BILINEAR)
        return mask if mask.point(lambda v: 255 if v >= 128 else 0).getbbox() else None

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

    def paste_or_not(self, image, mask):
        if mask is None or float(torch.rand(())) >= self.args.paste_prob:
            return image, False
        soft = self.args.blend == "gaussian" or (self.args.blend == "mix" and float(torch.rand(())) < 0.5)
        return copy_paste(image, mask, self.background(image.size), soft), True

    def sample(self, index):
        image, target = self.source[index]
        mask = self.load_mask(target, image.size) if self.args.paste_prob > 0 else None
        pasted = [self.paste_or_not(image, mask) for _ in range(2)]  # independent per view
        views = [self.augment(p) for p, _ in pasted]
        return image, mask, pasted, views

    def __getitem__(self, index):
        _, mask, pasted, views = self.sample(index)
        return views[0], views[1], torch.tensor([p for _, p in pasted]), mask is not None


# ---------------------------------------------------------------------------------------
# Model: MoCo v2 encoder = ResNet + MLP head, key encoder, queue
# ---------------------------------------------------------------------------------------


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
        self.encoder_q = Encoder(args.arch)
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        self.queue = MomentumQueue(args.queue_size)

    def forward(self, im_q, im_k):
        q = self.encoder_q(im_q)  # (N, 128)
        ema_update(self.encoder_k, self.encoder_q, self.args.ema)
        k = shuffled_key_forward(self.encoder_k, (im_k,), self.args.bn_batch)  # (N, 128)
        loss, acc = info_nce(q, k, self.queue.keys.clone(), self.args.temperature)  # enqueue writes in place
        self.queue.enqueue(k)
        return loss, {"loss": loss.detach(), "acc": acc}


# ---------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------


def info_nce(q, k, queue, tau):  # Same as in dupr.py, detco.py, insloc.py
    """InfoNCE (MoCo eq. 1) in fp32. q, k: (N, D) positives row by row; queue: (K, D)."""
    q, k = q.float(), k.float()
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    l_neg = q @ queue.t()  # (N, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / tau  # (N, 1 + K); the positive is class 0
    target = torch.zeros(len(q), dtype=torch.long, device=q.device)
    acc = (l_pos[:, 0] > l_neg.max(dim=1).values).float().mean()  # ties count as wrong
    return F.cross_entropy(logits, target), acc


# ---------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------


def train_one_epoch(model, loader, optimizer, epoch, args, log):  # Same as in dupr.py apart from the batch
    model.train()
    steps = min(args.steps, len(loader)) if args.steps else len(loader)
    sums, start = {}, time.time()
    end = start
    for it, (im_q, im_k, pasted, has_mask) in enumerate(loader):
        if it == steps:
            break
        data_time = time.time() - end
        lr = args.lr_actual * 0.5 * (1 + math.cos(math.pi * (epoch + it / steps) / args.epochs))
        for group in optimizer.param_groups:
            group["lr"] = lr
        im_q, im_k = im_q.to(args.device, non_blocking=True), im_k.to(args.device, non_blocking=True)
        if args.device.type == "cuda":
            im_q, im_k = im_q.to(memory_format=torch.channels_last), im_k.to(memory_format=torch.channels_last)
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss, terms = model(im_q, im_k)
        if not math.isfinite(loss.item()):
            raise SystemExit(f"error: loss is {loss.item()} at epoch {epoch} iteration {it}; "
                             f"the last good checkpoint in {args.output_dir} is kept")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        terms = {name: value.item() for name, value in terms.items()}
        terms.update(pasted=pasted.float().mean().item(), no_mask=(~has_mask).sum().item())
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value
        step_time, end = time.time() - end, time.time()
        if it % args.print_freq == 0 or it == steps - 1:
            log({"epoch": epoch, "iteration": it, "steps": steps, "lr": lr, **terms,
                 "img_per_s": args.batch_size / step_time, "data_time": data_time, "step_time": step_time,
                 "eta_s": (time.time() - start) / (it + 1) * (steps - it - 1), "memory_mb": peak_memory_mb(args)})
    averages = {name: value / steps for name, value in sums.items()}
    averages["no_mask"] = sums.get("no_mask", 0)  # a count over the epoch, not a mean
    return averages


# ---------------------------------------------------------------------------------------
# Plumbing: distributed setup, checkpoints, logging, preview. Same as in dupr.py.
# ---------------------------------------------------------------------------------------


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


def make_logger(args):
    def log(record):
        if not args.is_main:
            return
        with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if "iteration" in record:
            terms = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in (
                "epoch", "iteration", "steps", "lr", "img_per_s", "data_time", "step_time", "eta_s", "memory_mb"))
            print(f"epoch {record['epoch']} [{record['iteration'] + 1}/{record['steps']}] "
                  f"eta {record['eta_s'] / 60:.1f} min lr {record['lr']:.5f} {terms} "
                  f"{record['img_per_s']:.1f} img/s data {100 * record['data_time'] / record['step_time']:.0f}% "
                  f"mem {record['memory_mb']:.0f} MB", flush=True)
        else:
            print("epoch summary " + json.dumps(record), flush=True)
    return log


def load_checkpoint(model, optimizer, args):
    path = os.path.join(args.output_dir, "checkpoint.pth") if args.resume == "auto" else args.resume
    if args.resume == "none" or not os.path.exists(path):
        if args.resume not in ("auto", "none"):
            raise SystemExit(f"error: --resume {path}: no such file")
        return 0
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("method") != "dilo" or checkpoint["args"]["arch"] != args.arch:
        raise SystemExit(f"error: {path} is a {checkpoint.get('method')} {checkpoint['args']['arch']} checkpoint, "
                         f"not dilo {args.arch}; use another --output-dir or --resume none")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if args.is_main:
        print(f"resumed from {path} (epoch {checkpoint['epoch']} done)")
    return checkpoint["epoch"]


def save_checkpoint(model, optimizer, epoch, args):
    """checkpoint.pth (everything to resume) and backbone.pth (torchvision keys), atomically."""
    state = {"method": "dilo", "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}}
    for name, obj in (("checkpoint.pth", state), ("backbone.pth", model.encoder_q.backbone.state_dict())):
        path = os.path.join(args.output_dir, name)
        torch.save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)


def to_picture(tensor, size):
    """A normalised (3, H, W) view back to a PIL image."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    array = ((tensor * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array).resize((size, size))


def write_preview(dataset, args, cell=128):
    """Per sample: original | mask | view-1 source (pasted or not) | view 2 source | view 1 | view 2."""
    columns = ["original", "mask", "source q", "source k", "view q", "view k"]
    sheet = Image.new("RGB", (cell * len(columns), 16 + cell * args.preview), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(columns):
        draw.text((c * cell + 4, 2), name, fill="black")
    for row in range(args.preview):
        image, mask, pasted, views = dataset.sample(row)
        mask = mask.convert("RGB") if mask is not None else Image.new("RGB", image.size, "red")
        cells = [image, mask] + [p for p, _ in pasted]
        cells = [c.resize((cell, cell)) for c in cells] + [to_picture(v, cell) for v in views]
        for c, picture in enumerate(cells):
            sheet.paste(picture, (c * cell, 16 + row * cell))
        for c, (_, was_pasted) in enumerate(pasted):
            draw.text((4 + (2 + c) * cell, 20 + row * cell), "pasted" if was_pasted else "original", fill="yellow")
    path = os.path.join(args.output_dir, "preview.png")
    sheet.save(path)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main(args):
    setup_distributed(args)
    os.makedirs(args.output_dir, exist_ok=True)
    source = open_source(args.data, 128 if args.tiny else 5000, args.image_size * 8 // 7, min_side=args.image_size)
    dataset = CopyPasteTwoViews(source, args)
    if args.preview:
        return write_preview(dataset, args) if args.is_main else None
    seed_everything(args.seed)
    model = DiLo(args).to(args.device)
    if args.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=args.lr_actual, momentum=0.9, weight_decay=args.wd)
    start_epoch = load_checkpoint(model, optimizer, args)
    if args.is_main:
        count = lambda module: sum(p.numel() for p in module.parameters())
        print(f"world size {args.world_size}, device {args.device}, global batch {args.batch_size}, "
              f"lr {args.lr_actual:.4f} (= {args.lr} x {args.batch_size}/256), {len(dataset)} images, "
              f"backbone {count(model.encoder_q.backbone) / 1e6:.2f}M, head {count(model.encoder_q.head) / 1e6:.2f}M params")
    ddp_model = model
    if args.world_size > 1:  # the queue is identical on every rank already: do not broadcast buffers
        ddp_model = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    sampler = torch.utils.data.DistributedSampler(dataset, args.world_size, args.rank, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size // args.world_size, sampler=sampler,
                                         num_workers=args.workers, pin_memory=args.device.type == "cuda", drop_last=True)
    if len(loader) == 0:
        raise SystemExit(f"error: {len(dataset)} images give no full batch of {args.batch_size}")
    log = make_logger(args)
    for epoch in range(start_epoch, args.epochs):
        seed_everything(args.seed + 1000 * (epoch + 1) + args.rank)
        sampler.set_epoch(epoch)
        stats = train_one_epoch(ddp_model, loader, optimizer, epoch, args, log)
        if args.is_main:
            save_checkpoint(model, optimizer, epoch + 1, args)
            log({"epoch": epoch, **stats})
    if args.world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(get_args())
