"""What every trainer of this repository shares, and nothing else.

- `ResNetTrunk`: torchvision's ResNet without `avgpool`/`fc`, returning conv2_x..conv5_x
  (strides 4/8/16/32). Its state_dict keys ARE torchvision's (`layer4.2.bn3.weight`).
- `roi_align_boxes`: torchvision RoIAlign with boxes in input-image pixels, one per sample.
- The MoCo machinery: `MomentumQueue`, `ema_update`, `concat_all_gather`,
  `shuffled_key_forward` (shuffle BN, MoCo sec. 3.3).
- The data sources: `ImageFolderSource` (any folder of images, ImageNet `train/` aware)
  and `ToyWorld`, the built-in synthetic dataset, with `write_toy_world` (files + COCO json).

Nothing here carries a paper's claim: changing this file must not change one method's
recipe without changing all of them.
"""
import json
import os
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

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


# ---------------------------------------------------------------------------------------
# MoCo machinery: gather, queue, EMA, shuffle BN
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
def shuffled_key_forward(fn, inputs, bn_batch):
    """Shuffle BN (MoCo sec. 3.3): run `fn` on a random split of the key batch.

    `inputs` is a tuple of tensors whose dim 0 is the local batch (images, boxes, ...).
    They are gathered over processes, permuted with one permutation shared by all ranks,
    each rank runs `fn(*slice)` on its slice in chunks of `bn_batch` samples (so BN sees
    the per-GPU batch of the paper even on one device), and only the outputs (small
    embeddings, dim 0 = samples) are gathered back and un-permuted.
    Returns the outputs for this rank's own samples, in their original order.
    """
    local = len(inputs[0])
    gathered = [concat_all_gather(t) for t in inputs]  # each (world * local, ...)
    perm = _broadcast_permutation(len(gathered[0]), gathered[0].device)
    rank = dist.get_rank() if world_size() > 1 else 0
    mine = perm[rank * local:(rank + 1) * local]
    outputs = []
    for start in range(0, local, bn_batch):
        chunk = mine[start:start + bn_batch]
        out = fn(*[t[chunk] for t in gathered])
        outputs.append(out if isinstance(out, tuple) else (out,))
    results = []
    for parts in zip(*outputs):
        shuffled = concat_all_gather(torch.cat(parts))  # rows in `perm` order
        unshuffled = torch.empty_like(shuffled)
        unshuffled[perm] = shuffled
        results.append(unshuffled[rank * local:(rank + 1) * local])
    return tuple(results) if len(results) > 1 else results[0]


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

    An unreadable file is warned about once, counted, and replaced by another image; more
    than 1% failures aborts with a clear message. target = {"path": path relative to root}.
    """

    def __init__(self, root, min_side=0):
        if not os.path.isdir(root):
            raise SystemExit(f"error: --data {root}: no such directory")
        if os.path.isdir(os.path.join(root, "train")):
            root = os.path.join(root, "train")
        self.root, self.min_side = root, min_side
        self.paths = sorted(
            os.path.relpath(os.path.join(folder, name), root)
            for folder, _, names in os.walk(root, followlinks=True) for name in names
            if name.lower().endswith(IMAGE_EXTENSIONS))
        if not self.paths:
            raise SystemExit(f"error: --data {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        # Shared with DataLoader workers, so the 1% rule sees every worker's failures.
        self.failures = torch.zeros(1, dtype=torch.long).share_memory_()

    def __len__(self):
        return len(self.paths)

    def load(self, index):
        with open(os.path.join(self.root, self.paths[index]), "rb") as f:
            image = Image.open(f)
            image.load()
        return upscale_to(to_rgb(image), self.min_side)

    def __getitem__(self, index):
        for attempt in range(len(self.paths)):
            i = (index + attempt) % len(self.paths)
            try:
                return self.load(i), {"path": self.paths[i]}
            except (OSError, ValueError, SyntaxError) as error:  # what PIL raises on bad files
                self.failures += 1
                warnings.warn(f"skipping unreadable image {os.path.join(self.root, self.paths[i])}: {error}")
                if self.failures.item() > 0.01 * len(self.paths):
                    raise RuntimeError(f"more than 1% of the images under {self.root} are unreadable "
                                       f"({self.failures.item()} of {len(self.paths)}); check the data")
        raise RuntimeError(f"no readable image under {self.root}")


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
