"""DiLo's diagnosis of a backbone: its nearest neighbours, and the pixels that make them neighbours.

DiLo: Distilling Localization for Self-Supervised Representation Learning (Zhao, Wu, Lau, Lin,
AAAI 2021, arXiv:2004.06638), "Diagnosing Self-Supervised Models", Fig. 2 and 5: a contrastive
model's neighbours often share the query's background rather than its object, and its input
gradient spreads over the background. Any backbone of this repository (or torchvision ResNet).

    python -m tools.diagnose --tiny runs/dilo/backbone.pth        # toy world: queries from train, neighbours from val
    python -m tools.diagnose runs/dilo/checkpoint.pth --data /imagenet
    python -m tools.diagnose --tiny A/backbone.pth B/backbone.pth # diagnosis_1.png, diagnosis_2.png

Writes --output-dir (default runs/diagnose)/diagnosis.png, or with several backbones one sheet each,
diagnosis_1.png, diagnosis_2.png, ... in the order given, and prints one line per sheet. A sheet has one
row per query (6): the query, its input-gradient map |d sim / d pixel| (max over RGB, scaled to its 99th
percentile), and its top-3 neighbours in a held-out set, labelled with their cosine similarity.
The embedding is the pooled, L2-normalised c5 of the ResNet. Held out: for --data synthetic the first
--analysis-images (here 200) of the toy world's val split; for a folder all of DATA/val if present, else
the folder's images after the queries. Images are resized and centre-cropped to --image-size (--tiny: 64,
the trainers' --tiny views). The tools' shared --coco and --seed are not used: the queries come from
--data, and nothing is random.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image, ImageDraw

from common import ImageFolderSource, ToyWorld, font
from tools.analysis import NORMALISE, get_args, load_backbone

TINY = dict(data="synthetic", image_size=64)  # what `dilo.py --tiny` trains on


def add_flags(parser):
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' (the toy world) or an image folder (ImageNet layout aware): the queries")
    parser.set_defaults(analysis_images=200)  # the toy world's held-out images (a folder's: all of them)


def embed(trunk, x):
    return F.normalize(trunk(x)[-1].mean(dim=(2, 3)), dim=1)  # (N, C): pooled c5, any method's backbone


def query_and_held_out(data, image_size, queries, toy_held_out):
    """(query source, held-out set): the toy world's train and val splits (toy_held_out images), or a
    folder and DATA/val (else the folder's images after the queries)."""
    if data == "synthetic":  # at the trainers' image size * 8 // 7, as they generate it
        return ToyWorld(queries, image_size * 8 // 7), ToyWorld(toy_held_out, image_size * 8 // 7, "val")
    query_source = ImageFolderSource(data)
    val = os.path.join(data, "val")
    if os.path.isdir(val):
        return query_source, ImageFolderSource(val)
    return query_source, torch.utils.data.Subset(query_source, range(queries, len(query_source)))


def diagnose(trunk, query_source, held_out, image_size, path, queries=6, k=3, cell=128):
    """Write the sheet of `trunk` to `path`: per query, |d sim / d pixel| and its top-k held-out neighbours.
    -> ((queries, k) neighbour indices into the held-out set, held-out images)."""
    device = next(trunk.parameters()).device
    crop = T.Compose([T.Resize(image_size), T.CenterCrop(image_size)])
    with torch.no_grad():  # the held-out embeddings, 64 images at a time
        batches = [range(start, min(start + 64, len(held_out))) for start in range(0, len(held_out), 64)]
        keys = torch.cat([embed(trunk, torch.stack([NORMALISE(crop(held_out[i][0])) for i in b]).to(device))
                          for b in batches])  # (G, C)
    columns = ["query", "input gradient"] + [f"neighbour {i + 1}" for i in range(k)]
    sheet = Image.new("RGB", (cell * len(columns), 16 + cell * queries), "white")
    draw, text = ImageDraw.Draw(sheet), font(12)
    for c, name in enumerate(columns):
        draw.text((c * cell + 4, 2), name, fill="black", font=text)
    found = []
    for row in range(queries):
        x = NORMALISE(crop(query_source[row][0]))[None].to(device).requires_grad_(True)  # (1, 3, S, S)
        similarity, neighbours = (keys @ embed(trunk, x)[0]).topk(k)  # (k,) each
        # NOTE: the paper back-propagates a linear classifier trained with labels; without labels
        # we back-propagate what makes the neighbours neighbours: their summed similarity.
        similarity.sum().backward()
        gradient = x.grad[0].abs().amax(0)  # (S, S) per-pixel max over RGB
        gradient = (gradient / gradient.flatten().quantile(0.99).clamp_min(1e-12)).clamp(0, 1)
        cells = [crop(query_source[row][0]), Image.fromarray(np.uint8(255 * gradient.cpu().numpy()))]
        cells += [crop(held_out[int(i)][0]) for i in neighbours]
        for c, picture in enumerate(cells):
            sheet.paste(picture.convert("RGB").resize((cell, cell)), (c * cell, 16 + row * cell))
        for c, value in enumerate(similarity.tolist()):
            draw.text(((2 + c) * cell + 4, 20 + row * cell), f"cos {value:.3f}", fill="yellow", font=text,
                      stroke_width=1, stroke_fill="black")  # legible on any image
        found.append(neighbours.cpu())
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sheet.save(path)
    return torch.stack(found), len(keys)  # (queries, k), G


def main(argv=None, queries=6, k=3):
    """-> [(queries, k) neighbour indices into the held-out set], one per backbone, in the order given."""
    args = get_args("DiLo's diagnosis (paper Fig. 2, 5): nearest neighbours and input gradients", argv,
                    TINY, "runs/diagnose", add_flags)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    query_source, held_out = query_and_held_out(args.data, args.image_size, queries, args.analysis_images)
    names = ["diagnosis.png"] if len(args.backbones) == 1 else [
        f"diagnosis_{i + 1}.png" for i in range(len(args.backbones))]
    found = []
    for backbone, name in zip(args.backbones, names):
        trunk, _ = load_backbone(backbone, "backbone")
        path = os.path.join(args.output_dir, name)
        neighbours, held_out_size = diagnose(trunk.to(device), query_source, held_out, args.image_size, path,
                                             queries, k)
        print(f"wrote {path}: {backbone}, {queries} queries, top-{k} of {held_out_size} held-out images", flush=True)
        found.append(neighbours)
    return found


if __name__ == "__main__":
    main()
