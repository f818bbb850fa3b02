"""Linear readouts of frozen backbones: InsLoc's Table 3a, and view retrieval.

Yang, Wu, Zhou, Lin, "Instance Localization for Self-supervised Detection Pretraining", CVPR 2021,
arXiv:2102.08318, sec. 5.2 and Table 3a. On held-out images (the toy world's val split or a COCO
folder), from each backbone's frozen features of a box:
- localization: a linear classifier names the patch of a 3 x 3 grid (Fig. 4) a feature comes from;
- classification: a linear classifier names the category of a ground-truth object box;
- view retrieval: two seeded MoCo v2 views of each image; how often is view 1's nearest view 2 its own.
The linear classifiers train on the first half of the held-out images and are tested on the second.
Paper (R50-C4 on ImageNet): Loc 71.9 MoCo v2 -> 74.2 InsLoc (+2.3), Cls 67.7 -> 61.7 (-6.0).

    python -m tools.readout --tiny runs/dupr/backbone.pth runs/insloc/backbone.pth   # 64 px, 200 images
    python -m tools.readout A/backbone.pth B/checkpoint.pth --coco instances_val.json val/ --roi

BACKBONE: any backbone.pth, checkpoint.pth or torchvision ResNet state_dict. --roi: features by
RoIAlign on the full image's conv4_x -> conv5_x (the C4 detector's RoI head) instead of crops.
Outputs in --output-dir (runs/readout): readout.json (per backbone: localization, classification,
view_retrieval top-1; their chances; the feature variant) and readout.png (one group of bars per readout).
"""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw

from common import draw_colour, font, photometric, roi_align_boxes
from tools.analysis import COLOURS, NORMALISE, HeldOut, Progress, backbone_label, get_args, load_backbone

TINY = dict(image_size=64, analysis_images=200)  # the --tiny trainers' views


def grid_boxes(width, height, M=9):
    """Fig. 4: the image cut into a sqrt(M) x sqrt(M) grid -> boxes (M, 4) xyxy, row-major: box i is patch i."""
    g = round(M ** 0.5)
    xs, ys = torch.linspace(0, width, g + 1).tolist(), torch.linspace(0, height, g + 1).tolist()
    return torch.tensor([[xs[c], ys[r], xs[c + 1], ys[r + 1]] for r in range(g) for c in range(g)])


# NOTE: sec. 5.2 forwards each patch, pools RoI features and runs "the head network"; a backbone
# file has no head, so the pooled trunk output is read (the same for every method).
@torch.no_grad()
def box_features(trunk, image, boxes, size, roi, device):
    """(n, C) frozen features of `boxes` (n, 4) of a PIL image: each box's crop resized to size x size ->
    the trunk -> global average pool of conv5_x (the last level); roi=True: RoIAlign 14 x 14 of the full
    image's conv4_x -> conv5_x -> average pool (the C4 detector's RoI head, as insloc.EncoderC4)."""
    if roi:
        c4 = trunk.forward_to_res4(NORMALISE(image)[None].to(device))  # (1, C/2, H/16, W/16)
        index = torch.zeros(len(boxes), dtype=torch.long, device=device)
        rois = roi_align_boxes(c4, boxes.to(device), 14, 16, sampling_ratio=0, batch_index=index)  # (n, C/2, 14, 14)
        return trunk.layer4(rois).mean((2, 3)).cpu()
    crops = [NORMALISE(image.resize((size, size), Image.BILINEAR, box=tuple(box))) for box in boxes.tolist()]
    return trunk(torch.stack(crops).to(device))[-1].mean((2, 3)).cpu()


def linear_probe(train_x, train_y, test_x, test_y, classes, l2=1e-3):
    """Top-1 on the test split of a linear softmax classifier fit on the train split: features standardised
    with the train split's mean and std, loss = cross-entropy + l2 * |W|^2, zero init, full-batch L-BFGS
    (500 iterations, strong Wolfe line search). The problem is convex: no seed, no schedule."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    linear = nn.Linear(train_x.shape[1], classes)
    nn.init.zeros_(linear.weight), nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(linear((train_x - mean) / std), train_y) + l2 * linear.weight.square().sum()
        loss.backward()
        return loss
    optimizer.step(closure)
    return (linear((test_x - mean) / std).argmax(1) == test_y).float().mean().item()


@torch.no_grad()
def view_retrieval(trunks, images, size, seed, device, batch=64):
    """Instance retrieval with no queue and no momentum encoder: two seeded MoCo v2 views of each image
    (as loaded); how often is view 1's nearest view 2 (cosine of pooled conv5_x) its own? Top-1 per trunk."""
    torch.manual_seed(seed)  # the views' crops, flips and colours

    def view(image):  # MoCo v2's geometry on the uint8 image; its colour part runs batched below
        image = TF.pil_to_tensor(image)
        top, left, height, width = T.RandomResizedCrop.get_params(image, (0.2, 1.0), (3 / 4, 4 / 3))
        crop = TF.resized_crop(image, top, left, height, width, [size, size], antialias=True)
        return TF.hflip(crop) if torch.rand(()) < 0.5 else crop

    views = []  # 2 x (trunks, G, C): every trunk embeds the same two views
    for _ in range(2):
        chunks = []
        for start in range(0, len(images), batch):
            x = torch.stack([view(images[i][0]) for i in range(start, min(start + batch, len(images)))])
            x = photometric(x.to(device), draw_colour(len(x)))
            chunks.append(torch.stack([F.normalize(trunk(x)[-1].mean((2, 3)), dim=1)
                                       for trunk in trunks]))  # (trunks, b, C)
        views.append(torch.cat(chunks, dim=1))
    own = (views[0] @ views[1].transpose(1, 2)).argmax(2).cpu() == torch.arange(views[0].shape[1])  # (trunks, G)
    return own.float().mean(1).tolist()


def draw_bars(groups, labels, path, height=320):
    """A PIL bar chart: groups = [(name, values per backbone, chance)]; bars coloured by backbone (legend
    below), a dashed black line at chance, the value above each bar, a y axis of accuracy 0..1."""
    text, bar, axis = font(), 36, 50
    top, bottom = 40, height - 50 - 16 * len(labels)
    width = max(bar * len(labels), 120) + 30  # per group
    sheet = Image.new("RGB", (axis + 10 + len(groups) * width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((axis, 6), "top-1 accuracy of each readout on held-out images; dashed: chance", fill="black", font=text)
    draw.line((axis, top, axis, bottom), fill="black")
    for k in range(6):  # y ticks: accuracy 0, 0.2, ..., 1
        y = bottom - k / 5 * (bottom - top)
        draw.line((axis - 4, y, axis, y), fill="black")
        draw.text((8, y - 7), f"{k / 5:.1f}", fill="black", font=text)
    for g, (name, values, chance) in enumerate(groups):
        left = axis + 10 + g * width
        y_chance = bottom - chance * (bottom - top)
        for b, value in enumerate(values):
            y = bottom - value * (bottom - top)
            draw.rectangle((left + b * bar, y, left + (b + 1) * bar - 4, bottom), fill=COLOURS[b % len(COLOURS)])
            draw.text((left + b * bar, min(y, y_chance) - 16), f"{value:.2f}", fill="black", font=text)  # above both
        y = y_chance
        for x in range(left - 4, left + bar * len(values), 8):  # dashed: the chance line is not a bar's edge
            draw.line((x, y, min(x + 4, left + bar * len(values)), y), fill="black", width=2)
        draw.text((left, bottom + 4), f"{name}\nchance {chance:.3f}", fill="black", font=text)
    for b, label in enumerate(labels):
        draw.text((axis, bottom + 36 + 16 * b), label, fill=COLOURS[b % len(COLOURS)], font=text)
    sheet.save(path)


# NOTE: the paper's Cls is ImageNet linear classification of whole images; here the objects' boxes.
def readout(args):
    """Table 3a's localization (patch index of a 3 x 3 grid) and classification (object category of a
    ground-truth box) linear readouts, and view retrieval -> readout.json and readout.png."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trunks = [load_backbone(path, "backbone")[0].to(device) for path in args.backbones]
    labels = [backbone_label(path) for path in args.backbones]
    held_out = HeldOut(args.analysis_images, args.image_size, args.coco)
    tasks = {"localization": 9, "classification": len(held_out.categories)}  # classes; M = 9
    features, targets, train = ({task: [] for task in tasks} for _ in range(3))
    progress = Progress("readout: RoI features", len(held_out))
    for index in range(len(held_out)):
        progress(index + 1)
        image, target = held_out[index]
        for task, boxes, y in (("localization", grid_boxes(image.width, image.height), torch.arange(9)),
                               ("classification", target["boxes"], target["labels"] - 1)):
            keep = (boxes[:, 2:] - boxes[:, :2]).amin(1) >= 1  # boxes at least a pixel wide and high
            if keep.any():
                features[task].append([box_features(t, image, boxes[keep], args.image_size, args.roi, device)
                                       for t in trunks])
                targets[task].append(y[keep])
                train[task].append(torch.full((int(keep.sum()),), index < len(held_out) // 2))
    read = "RoIAlign 14 x 14 of conv4_x -> conv5_x" if args.roi else "crop resized to image_size -> conv5_x"
    result = {"images": len(held_out), "image_size": args.image_size, "features": read, "pool": "global average",
              "backbones": args.backbones}
    for task, classes in tasks.items():
        y, split = torch.cat(targets[task]), torch.cat(train[task])
        if not split.any() or split.all():
            raise SystemExit(f"error: tools.readout: too few held-out images with boxes for the {task} readout")
        x = [torch.cat([f[t] for f in features[task]]) for t in range(len(trunks))]
        result[task] = [linear_probe(x_t[split], y[split], x_t[~split], y[~split], classes) for x_t in x]
        result[f"{task}_chance"] = torch.bincount(y[~split]).max().item() / int((~split).sum())  # majority class
    as_loaded = torch.utils.data.Subset(held_out.source, range(len(held_out)))  # read lazily, twice
    result["view_retrieval"] = view_retrieval(trunks, as_loaded, args.image_size, args.seed, device)
    result["view_retrieval_chance"] = 1 / len(held_out)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "readout.json"), "w") as f:
        json.dump(result, f, indent=1)
    names = ("localization", "classification", "view_retrieval")
    draw_bars([(name, result[name], result[f"{name}_chance"]) for name in names], labels,
              os.path.join(args.output_dir, "readout.png"))
    for t, label in enumerate(labels):
        print(f"{label}: localization {result['localization'][t]:.3f}, "
              f"classification {result['classification'][t]:.3f}, view retrieval {result['view_retrieval'][t]:.3f}")
    print(f"chance: localization {result['localization_chance']:.3f}, classification "
          f"{result['classification_chance']:.3f}, view retrieval {result['view_retrieval_chance']:.3f}; "
          "paper (theirs, Table 3a, R50-C4 on ImageNet): Loc 71.9 MoCo v2 -> 74.2 InsLoc (+2.3), "
          f"Cls 67.7 -> 61.7 (-6.0); wrote readout.json, readout.png in {args.output_dir}")
    return result


def add_flags(parser):
    parser.add_argument("--roi", action="store_true",
                        help="features by RoIAlign on the full image's conv4_x -> conv5_x, not by crops")


def main(argv=None):
    return readout(get_args("InsLoc Table 3a linear readouts and view retrieval of frozen backbones", argv, TINY,
                            "runs/readout", add_flags))


if __name__ == "__main__":
    main()
