"""DUPR's analysis of frozen backbones: the IoU-similarity curve (Fig. 6, eq. 9) and the correspondence
of two views (Fig. 7). Ding, Xie, Xu, Jiang, Li, Luo, Xia, "Deeply Unsupervised Patch Re-Identification
for Pre-training Object Detectors", IEEE TPAMI 2024, arXiv:2103.04814, sec. 4.6 (dupr.py trains DUPR).

Fig. 6: per ground-truth box G of a held-out image, 20 RoIs with IoUs spread over [0, 1]; RoIAlign of
conv4_x on G gives q and on a RoI k_alpha, both S x S, and eq. 9 scores them,

    Sim(q, k_alpha) = 1/(S*S) sum_p q_p . k_alpha,p        (q_p, k_alpha,p L2-normalised over channels);

the curve is the mean Sim per IoU tenth. A steeper curve (slope: mean Sim at IoU >= 0.5 minus mean Sim at
IoU < 0.3, the paper's reading) means features that tell a well-placed box from a badly placed one.
Fig. 7: two training views per image (dupr.MoCoV2ViewWithBox); each conv4_x cell of view 1 is matched to
its most similar cell of view 2 and scored against the true cell that the crop geometry gives.

    python -m tools.iou_curve --tiny runs/dupr/backbone.pth runs/dilo/backbone.pth   # the --tiny runs
    python -m tools.iou_curve A/backbone.pth B/backbone.pth --coco instances_val.json val/

BACKBONE: any trainer's backbone.pth or checkpoint.pth, or a torchvision ResNet state_dict, as many as
wanted. Defaults are the paper's: 1000 images, 224 px, S = 14 (conv4_x's side at 224 px, dupr.py's S);
--tiny: 200 images, 64 px, S = 4 (dupr.py --tiny's sizes). Writes to --output-dir (runs/iou_curve):
iou_curve.png (a curve per backbone), iou_curve.json (rois_per_bin, correspondence_chance; per backbone
similarity_per_bin, slope, correspondence), correspondence.png; prints a line per backbone.
Method and numbers: docs/analysis.md.
"""
import json
import os

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw

from common import font, roi_align_boxes
from dupr import LEVELS, TINY, MoCoV2ViewWithBox, seed_everything
from tools.analysis import (NORMALISE, HeldOut, Progress, backbone_label, draw_curves, get_args as analysis_args,
                            load_backbone)

# --tiny: dupr.py --tiny's image size and its conv4_x S (the feature map's side at 64 px)
TINY_ANALYSIS = dict(image_size=TINY["image_size"], analysis_images=200,
                     roi_size=TINY["roi_size"][LEVELS.index("conv4")])


def get_args(argv=None):
    add_flags = lambda parser: parser.add_argument(
        "--roi-size", type=int, default=14, help="S, side of the conv4_x RoIAlign grid (eq. 9; dupr.py's conv4 S)")
    args = analysis_args("DUPR Fig. 6 (eq. 9) and Fig. 7 on frozen backbones", argv, TINY_ANALYSIS,
                         "runs/iou_curve", add_flags)
    if args.roi_size < 1:
        raise SystemExit(f"error: --roi-size {args.roi_size}: must be >= 1")
    return args


def sample_rois(box, targets, width, height, generator, candidates=64, steps=30):
    """RoIs in the image whose IoU with the ground-truth box G (4,) is each of `targets` (T,): per t, a
    random box `far` in the image (sides log-uniform) with IoU(G, far) <= t (else the lowest), then
    bisection on the segment B(lam) = (1 - lam) G + lam far, whose IoU is 1 at lam = 0 and continuous,
    so it crosses t. Returns rois (T, 4) and their actual IoU (T,).
    NOTE: sec. 4.6 does not say how its RoIs are drawn; this sampler is ours (docs/analysis.md)."""
    n = len(targets)
    size = torch.tensor([float(width), float(height)])
    sides = size ** torch.rand(n, candidates, 2, generator=generator)  # (T, n, 2) log-uniform in [1, image side]
    corner = torch.rand(n, candidates, 2, generator=generator) * (size - sides)  # uniform position in the image
    boxes = torch.cat([corner, corner + sides], dim=2)  # (T, n, 4) xyxy
    iou = torchvision.ops.box_iou(box[None], boxes.flatten(0, 1)).reshape(n, candidates)
    pick = torch.where(iou <= targets[:, None], torch.rand(n, candidates, generator=generator), -iou)  # feasible first
    far = boxes[torch.arange(n), pick.argmax(1)]  # (T, 4)
    lo, hi = torch.zeros(n, 1), torch.ones(n, 1)  # invariant: IoU(B(lo)) > t >= IoU(B(hi))
    for _ in range(steps):
        mid = (lo + hi) / 2
        above = torchvision.ops.box_iou(box[None], (1 - mid) * box + mid * far)[0][:, None] > targets[:, None]
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    rois = (1 - hi) * box + hi * far
    return rois, torchvision.ops.box_iou(box[None], rois)[0]


@torch.no_grad()
def iou_similarity(trunks, held_out, S, seed, device, per_box=20):
    """Eq. 9 per trunk: per ground-truth box G, `per_box` RoIs with IoUs stratified over [0, 1] (one per
    1/per_box bin); q = RoIAlign(conv4_x, G), k_alpha = RoIAlign(conv4_x, RoI), both S x S; Sim = mean
    over the S*S positions p of q_p . k_alpha,p (unit vectors). The RoIs are the same for every trunk.
    Returns IoU (R,) and Sim (trunks, R)."""
    generator, ious, sims = torch.Generator().manual_seed(seed), [], []
    progress = Progress("iou-curve: Sim of RoIs (Fig. 6)", len(held_out))
    for done, (image, target) in enumerate((held_out[i] for i in range(len(held_out))), start=1):
        x = NORMALISE(image)[None].to(device)
        features = [trunk.forward_to_res4(x) for trunk in trunks]  # conv4_x, stride 16
        for box in target["boxes"][(target["boxes"][:, 2:] - target["boxes"][:, :2]).amin(1) >= 1]:
            targets = (torch.arange(per_box) + torch.rand(per_box, generator=generator)) / per_box
            rois, iou = sample_rois(box, targets, image.width, image.height, generator)
            boxes = torch.cat([box[None], rois]).to(device)  # (1 + T, 4): G first
            index = torch.zeros(len(boxes), dtype=torch.long, device=device)
            regions = [F.normalize(roi_align_boxes(c4, boxes, S, 16, sampling_ratio=0, batch_index=index), dim=1)
                       for c4 in features]  # (1 + T, C, S, S)
            sims.append(torch.stack([(r[:1] * r[1:]).sum(1).mean((1, 2)) for r in regions]).cpu())  # (trunks, T)
            ious.append(iou)
        progress(done)
    if not ious:
        raise SystemExit("error: the held-out images have no ground-truth boxes")
    return torch.cat(ious), torch.cat(sims, dim=1)


def true_cells(crop_1, flip_1, crop_2, flip_2, size, n):
    """Fig. 7's ground truth: for each of the n x n conv cells of view 1 (row-major), the (row, col) of
    the view-2 cell showing the original pixel under its centre, or (-1, -1) outside view 2. Views are
    size x size; the geometry of dupr.intersection_in_views: x' = (x - crop_x1) * size / crop_w, mirrored."""
    centres = (torch.arange(n) + 0.5) * size / n  # view pixels
    y, x = torch.meshgrid(centres, centres, indexing="ij")  # (n, n)
    x = size - x if flip_1 else x
    x, y = crop_1[0] + x * (crop_1[2] - crop_1[0]) / size, crop_1[1] + y * (crop_1[3] - crop_1[1]) / size  # original
    x, y = (x - crop_2[0]) * size / (crop_2[2] - crop_2[0]), (y - crop_2[1]) * size / (crop_2[3] - crop_2[1])  # view 2
    x = size - x if flip_2 else x
    cells = (torch.stack([y, x], dim=-1) * n / size).floor().long().flatten(0, 1)  # (n*n, 2)
    return torch.where(((cells >= 0) & (cells < n)).all(1, keepdim=True), cells, -1)


@torch.no_grad()
def correspondence(trunks, labels, held_out, size, seed, device, path, shown=3, cell=128):
    """Fig. 7: two training views (MoCoV2ViewWithBox) per image; each conv4_x cell of view 1 is matched
    to its most similar (cosine) cell of view 2. Returns per trunk the share of matches within one cell
    (Chebyshev distance <= 1) of the true cell, and that share for a uniformly random match. Draws the
    first `shown` images: view 1 | view 2 per trunk, a line per cell to its match (green: within one).
    NOTE: Fig. 7 is qualitative (and its models have losses on conv5_x only); the share is ours."""
    seed_everything(seed)
    sheet = Image.new("RGB", (2 * cell * len(trunks), 16 + cell * shown + 48), "white")  # + legend
    draw, augment = ImageDraw.Draw(sheet), MoCoV2ViewWithBox(size)
    hits, chance, total = torch.zeros(len(trunks)), 0.0, 0
    progress = Progress("iou-curve: correspondence (Fig. 7)", len(held_out))
    for index in range(len(held_out)):
        progress(index + 1)
        (view_1, crop_1, flip_1), (view_2, crop_2, flip_2) = [augment(held_out[index][0]) for _ in range(2)]
        x = torch.stack([NORMALISE(view_1), NORMALISE(view_2)]).to(device)
        maps = [F.normalize(trunk.forward_to_res4(x), dim=1).flatten(2).cpu() for trunk in trunks]  # (2, C, n*n)
        n = round(maps[0].shape[2] ** 0.5)
        truth = true_cells(crop_1, flip_1, crop_2, flip_2, size, n)  # (n*n, 2)
        grid = torch.cartesian_prod(torch.arange(n), torch.arange(n))  # (n*n, 2) row-major (row, col)
        matches = torch.stack([grid[(m[0].t() @ m[1]).argmax(1)] for m in maps])  # (trunks, n*n, 2): best view-2 cell
        near = (matches - truth).abs().amax(2) <= 1  # (trunks, n*n)
        valid = truth[:, 0] >= 0
        hits, total = hits + near[:, valid].sum(1), total + int(valid.sum())
        chance += ((grid[None] - truth[valid, None]).abs().amax(2) <= 1).float().mean(1).sum().item()
        for t in range(len(trunks) if index < shown else 0):
            at = lambda rc, column: ((column + (rc[1] + 0.5) / n) * cell, 16 + (index + (rc[0] + 0.5) / n) * cell)
            sheet.paste(view_1.resize((cell, cell)), (2 * t * cell, 16 + index * cell))
            sheet.paste(view_2.resize((cell, cell)), ((2 * t + 1) * cell, 16 + index * cell))
            for p in range(n * n):
                colour = "gray" if not valid[p] else "lime" if near[t, p] else "red"
                draw.line(at(grid[p], 2 * t) + at(matches[t, p], 2 * t + 1), fill=colour)
    for t, label in enumerate(labels):
        draw.text((2 * t * cell + 4, 2), f"{label}: {hits[t] / max(total, 1):.3f} within one cell", fill="black")
    draw.text((4, 17 + cell * shown), "line: view 1 cell -> its most similar view 2 cell;\ngreen: within one cell of "
              "the truth,\nred: farther; gray: not in view 2", fill="black", font=font(11))
    sheet.save(path)
    return (hits / max(total, 1)).tolist(), chance / max(total, 1)


def iou_curve(args, bins=10):
    """iou_curve.png/.json (Fig. 6, eq. 9) and correspondence.png (Fig. 7) in --output-dir; returns the JSON."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trunks = [load_backbone(path, "backbone")[0].to(device) for path in args.backbones]
    labels = [backbone_label(path) for path in args.backbones]
    held_out, S = HeldOut(args.analysis_images, args.image_size, args.coco), args.roi_size
    os.makedirs(args.output_dir, exist_ok=True)
    iou, sim = iou_similarity(trunks, held_out, S, args.seed, device)  # (R,), (trunks, R)
    which = (iou * bins).long().clamp(max=bins - 1)  # (R,) bin of each RoI
    count = torch.bincount(which, minlength=bins)
    binned = torch.zeros(len(trunks), bins).index_add_(1, which, sim) / count.clamp(min=1)  # (trunks, bins)
    slope = (sim[:, iou >= 0.5].mean(1) - sim[:, iou < 0.3].mean(1)).tolist()  # the paper's reading of Fig. 6
    shares, chance = correspondence(trunks, labels, held_out, args.image_size, args.seed, device,
                                    os.path.join(args.output_dir, "correspondence.png"))
    centres = [(b + 0.5) / bins for b in range(bins) if count[b]]
    curves = [(f"{label}: Sim(IoU >= 0.5) - Sim(IoU < 0.3) = {s:+.3f}", list(zip(centres, curve[count > 0].tolist())))
              for label, s, curve in zip(labels, slope, binned)]  # one line per backbone, over the bins with RoIs
    draw_curves(curves, os.path.join(args.output_dir, "iou_curve.png"), "IoU of the RoI with the ground-truth box",
                f"Sim (eq. 9), conv4_x, S = {S}")
    result = {"images": len(held_out), "image_size": args.image_size, "S": S, "rois_per_bin": count.tolist(),
              "correspondence_chance": chance,
              "backbones": [{"path": path, "similarity_per_bin": curve.tolist(), "slope": s, "correspondence": share}
                            for path, curve, s, share in zip(args.backbones, binned, slope, shares)]}
    with open(os.path.join(args.output_dir, "iou_curve.json"), "w") as f:
        json.dump(result, f, indent=1)
    for label, s, share in zip(labels, slope, shares):
        print(f"{label}: Sim(IoU >= 0.5) - Sim(IoU < 0.3) = {s:+.4f}; correspondence {share:.3f} (chance {chance:.3f})")
    print("paper (theirs, Fig. 6, R50 on ImageNet val): DUPR's curve lies above MoCo v2's at IoU >= 0.5 and below it "
          f"at IoU < 0.3; wrote iou_curve.png, iou_curve.json, correspondence.png in {args.output_dir}")
    return result


def main(argv=None):
    return iou_curve(get_args(argv))


if __name__ == "__main__":
    main()
