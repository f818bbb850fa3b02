"""The repository's test suite: `python -m pytest -q test_all.py` (CPU, a few minutes, no network).

Tests assert properties a reader cares about: geometry against ground truth, equivalence
with plain reference computations, exact resume, identical ranks, refused bad input.
"""
import contextlib
import copy
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import common
import dilo

HERE = os.path.dirname(os.path.abspath(__file__))


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def state_equal(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol), key


def killed_and_resumed(module, args, tmp_path, monkeypatch):
    """Train 2 epochs in one run, and again killed during epoch 2 then rerun with the same command.

    Asserts what every trainer must keep exactly (weights, queues, SGD momentum); returns both
    final checkpoints for method-specific checks.
    """
    module.main(module.get_args(args + ["--epochs", "2", "--output-dir", str(tmp_path / "once")]))
    train_one_epoch = module.train_one_epoch

    def killed_in_epoch_1(model, loader, optimizer, epoch, *rest):
        if epoch == 1:
            raise KeyboardInterrupt
        return train_one_epoch(model, loader, optimizer, epoch, *rest)

    twice = args + ["--epochs", "2", "--output-dir", str(tmp_path / "twice")]
    monkeypatch.setattr(module, "train_one_epoch", killed_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        module.main(module.get_args(twice))
    monkeypatch.undo()
    module.main(module.get_args(twice))
    once = torch.load(tmp_path / "once" / "checkpoint.pth", weights_only=True)
    twice = torch.load(tmp_path / "twice" / "checkpoint.pth", weights_only=True)
    assert once["epoch"] == twice["epoch"] == 2
    state_equal(once["model"], twice["model"])  # both encoders, heads, every queue and pointer
    for index, buffers in once["optimizer"]["state"].items():  # SGD momentum buffers
        assert torch.allclose(buffers["momentum_buffer"], twice["optimizer"]["state"][index]["momentum_buffer"], atol=1e-6)
    return once, twice


RANK_CHECK = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {here!r})
import {module} as trainer
forward = trainer.{model}.forward
def checked_forward(self, *batch):
    # state after the previous step, on every rank: parameters of f_q and f_k, and every queue
    queues = [b.flatten() for name, b in self.named_buffers() if name.endswith("keys")]
    assert len(queues) == {queues}, len(queues)
    flat = torch.cat([p.detach().flatten() for p in self.parameters()] + queues)
    copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, flat)
    assert all(torch.equal(copies[0], c) for c in copies), "ranks differ"
    return forward(self, *batch)
trainer.{model}.forward = checked_forward
args = trainer.get_args(sys.argv[1:])
trainer.main(args)
print("rank", args.rank, "checked", "ok")
"""


def run_two_ranks(module, model, queues, port, args, tmp_path):
    """torchrun --nproc_per_node=2 (gloo): parameters and queues identical on both ranks at every forward."""
    script = tmp_path / "check.py"
    script.write_text(RANK_CHECK.format(here=HERE, module=module, model=model, queues=queues))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               str(script), "--tiny", "--epochs", "1", "--workers", "0", "--output-dir", str(tmp_path / "run")] + args
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("checked ok") == 2
    assert (tmp_path / "run" / "backbone.pth").exists()


# ---------------------------------------------------------------------------------------
# common.py
# ---------------------------------------------------------------------------------------


def test_queue_keeps_last_K_keys_in_ring_order():
    K, dim = 10, 3
    queue = common.MomentumQueue(K, dim)
    sent = []
    for n in (3, 4, 7, 1, 13, 2):  # sizes that do not divide K, one batch larger than K
        keys = torch.randn(n, dim)
        sent.append(keys)
        queue.enqueue(keys)
    sent = torch.cat(sent)
    ptr = int(queue.ptr)
    assert ptr == len(sent) % K
    # Reading the ring from the pointer gives the last K keys, oldest first.
    ring = torch.cat([queue.keys[ptr:], queue.keys[:ptr]])
    assert torch.equal(ring, sent[-K:])


def test_shuffled_key_forward_equals_plain_forward_for_per_sample_fn():
    torch.manual_seed(0)
    x, boxes = torch.randn(10, 4), torch.randn(10, 4)
    linear = nn.Linear(4, 2)
    fn = lambda images, b: (linear(images), images.sum(1, keepdim=True) + b)  # per-sample, two outputs
    out, moved = common.shuffled_key_forward(fn, (x, boxes), bn_batch=3)
    assert torch.allclose(out, linear(x), atol=1e-6)
    assert torch.allclose(moved, x.sum(1, keepdim=True) + boxes, atol=1e-6)  # boxes travel with images


def test_shuffled_key_forward_changes_bn_statistics():
    torch.manual_seed(0)
    x = torch.randn(16, 4) * torch.linspace(0.5, 3, 16)[:, None]
    bn = nn.BatchNorm1d(4).train()
    chunked = common.shuffled_key_forward(bn, (x,), bn_batch=4)
    whole = common.shuffled_key_forward(bn, (x,), bn_batch=16)
    assert torch.allclose(whole, bn(x), atol=1e-5)  # one chunk = plain BN, order restored
    assert (chunked - whole).abs().max() > 0.1  # four chunks normalise with other statistics


def test_trunk_state_dict_is_torchvision_resnet():
    trunk = common.ResNetTrunk("resnet18")
    net = torchvision.models.resnet18()
    result = net.load_state_dict(trunk.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    assert trunk.forward_to_res4(torch.randn(1, 3, 64, 64)).shape == (1, 256, 4, 4)


def test_toy_world_is_deterministic_and_consistent():
    world = common.ToyWorld(20, 96)
    for i in range(20):
        image, target = world[i]
        again, _ = world[i]
        assert np.array_equal(np.asarray(image), np.asarray(again))
        masks, boxes = target["masks"].bool(), target["boxes"]
        assert 1 <= len(boxes) <= 4 and target["labels"].min() >= 1
        union = np.asarray(target["mask"]) > 0
        assert np.array_equal(union, masks.any(0).numpy())
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
    train, val = common.ToyWorld(5, 96, "train"), common.ToyWorld(5, 96, "val")
    assert not np.array_equal(np.asarray(train[0][0]), np.asarray(val[0][0]))


def test_write_toy_world_coco_json(tmp_path):
    common.write_toy_world(str(tmp_path), 4, "val", image_size=64, saliency_dir=str(tmp_path / "sal"))
    with open(tmp_path / "instances_val.json") as f:
        coco = json.load(f)
    world = common.ToyWorld(4, 64, "val")
    for image_info in coco["images"]:
        image, target = world[image_info["id"] - 1]
        assert np.array_equal(np.asarray(Image.open(tmp_path / "val" / image_info["file_name"])), np.asarray(image))
        annotations = [a for a in coco["annotations"] if a["image_id"] == image_info["id"]]
        for annotation, mask in zip(annotations, target["masks"]):
            counts, (h, w) = annotation["segmentation"]["counts"], annotation["segmentation"]["size"]
            values = np.repeat(np.arange(len(counts)) % 2, counts).astype(np.uint8)
            assert np.array_equal(values.reshape(w, h).T, mask.numpy())
        assert (tmp_path / "sal" / image_info["file_name"]).exists()


def _bad_folder(tmp_path, good=120):
    folder = tmp_path / "images" / "train" / "class_a"
    folder.mkdir(parents=True)
    world = common.ToyWorld(good, 48)
    for i in range(good):
        world[i][0].save(folder / f"{i:03d}.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(folder / "alpha.png")
    Image.new("L", (50, 40), 100).save(folder / "gray.PNG")
    Image.new("RGB", (10, 10), (0, 255, 0)).save(folder / "tiny.bmp")
    Image.new("I;16", (40, 40), 40000).save(folder / "deep.png")
    return tmp_path / "images"


def test_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="no such directory"):
        common.open_source(str(tmp_path / "missing"), 0, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        common.open_source(str(tmp_path / "empty"), 0, 0)
    source = common.open_source(str(_bad_folder(tmp_path)), 0, 0, min_side=64)
    assert source.root.endswith("train") and len(source) == 125  # ImageNet layout, recursive, any case
    for name in ("alpha.png", "gray.PNG", "tiny.bmp", "deep.png"):
        image, target = source[source.paths.index(os.path.join("class_a", name))]
        assert image.mode == "RGB" and min(image.size) >= 64 and target["path"].endswith(name)
    corrupt = source.paths.index(os.path.join("class_a", "corrupt.jpg"))
    with pytest.warns(UserWarning, match="corrupt.jpg"):
        image, target = source[corrupt]
    assert target["path"] != source.paths[corrupt] and int(source.failures) == 1
    source.failures += 1  # a second failure among 125 images is over 1%
    with pytest.raises(RuntimeError, match="more than 1%"):
        with pytest.warns(UserWarning):
            source[corrupt]


# ---------------------------------------------------------------------------------------
# dilo.py
# ---------------------------------------------------------------------------------------

SMALL = ["--tiny", "--epochs", "1", "--image-size", "32", "--batch-size", "8", "--queue-size", "20", "--bn-batch", "4",
         "--workers", "0", "--print-freq", "1"]


def test_copy_paste_pixels_and_probabilities():
    world = common.ToyWorld(30, 64)
    image, target = world[0]
    mask = target["mask"]
    gray = Image.new("RGB", image.size, (17, 17, 17))
    pasted = np.asarray(dilo.copy_paste(image, mask, gray, soft=False))
    on = np.asarray(mask) >= 128
    assert np.array_equal(pasted[on], np.asarray(image)[on]) and (pasted[~on] == 17).all()
    soft = np.asarray(dilo.copy_paste(image, mask, gray, soft=True)).astype(int)
    assert (soft != pasted).any()  # blended border
    decisions = {}
    for p in (0.0, 1.0, 0.5):
        dataset = dilo.CopyPasteTwoViews(world, dilo.get_args(SMALL + ["--paste-prob", str(p)]))
        decisions[p] = torch.stack([dataset[i][2] for i in range(30)])  # (30, 2) pasted flags
    assert not decisions[0.0].any() and decisions[1.0].all()
    pairs = {tuple(row.tolist()) for row in decisions[0.5]}
    assert (True, False) in pairs and (False, True) in pairs  # the views decide independently


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dilo_tiny")
    dilo.main(dilo.get_args(["--tiny", "--epochs", "1", "--steps", "10", "--output-dir", str(out), "--workers", "0"]))
    return out


def test_dilo_tiny_run_writes_its_outputs(tiny_run):
    records = read_log(tiny_run / "log.jsonl")
    steps = [r for r in records if "iteration" in r]
    assert [r["epoch"] for r in records if "iteration" not in r] == [0]  # one summary per epoch
    for key in ("loss", "acc", "lr", "img_per_s", "data_time", "step_time", "memory_mb", "pasted", "no_mask"):
        assert all(np.isfinite(r[key]) for r in steps), key
    assert all(0 < r["pasted"] < 1 for r in records if "iteration" not in r)  # p = 0.3 per view


def test_dilo_training_reduces_infonce_on_fixed_views():
    """The gradient path works: on fixed views of 32 images the InfoNCE loss falls well below
    ln(K + 1) once the queue is full (a 1-minute run on fresh views does not get that far)."""
    torch.manual_seed(0)
    args = dilo.get_args(SMALL + ["--queue-size", "256", "--bn-batch", "8"])
    model = dilo.DiLo(args)
    world = common.ToyWorld(32, 36)
    augment = dilo.moco_v2_augmentation(32)
    images = [world[i][0] for i in range(32)]
    im_q, im_k = torch.stack([augment(p) for p in images]), torch.stack([augment(p) for p in images])
    flags = torch.zeros(32, 2, dtype=torch.bool), torch.ones(32, dtype=torch.bool)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    losses = []
    for _ in range(50):
        loss, _ = model(im_q, im_k, *flags)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    full_queue = np.mean(losses[8:13])  # 256 / 32 = 8 steps fill the queue with real keys
    assert np.mean(losses[-5:]) < full_queue - 0.5 and full_queue > 4.5


def test_backbone_loads_into_torchvision_and_matches_encoder(tiny_run):
    state = torch.load(tiny_run / "backbone.pth", weights_only=True)
    net = torchvision.models.resnet18()
    result = net.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    model = dilo.DiLo(dilo.get_args(["--tiny"]))
    model.load_state_dict(torch.load(tiny_run / "checkpoint.pth", weights_only=True)["model"])
    net.eval(), model.eval()
    x = torch.randn(2, 3, 64, 64)
    c5 = nn.Sequential(*list(net.children())[:-2])(x)
    assert torch.allclose(c5, model.encoder_q.backbone(x)[-1], atol=1e-5)


def test_exact_resume(tmp_path, monkeypatch):
    """2 epochs in one run == killed during epoch 2, then the same command rerun."""
    once, twice = killed_and_resumed(dilo, SMALL + ["--steps", "2", "--paste-prob", "0.5"], tmp_path, monkeypatch)
    assert torch.equal(once["model"]["queue.keys"], twice["model"]["queue.keys"])


def test_resume_refuses_other_method_and_malicious_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        dilo.main(dilo.get_args(SMALL + ["--resume", str(tmp_path / "evil.pth"), "--output-dir", str(tmp_path)]))
    assert not (tmp_path / "pwned").exists()
    torch.save({"method": "dupr", "args": {"arch": "resnet18"}}, tmp_path / "checkpoint.pth")
    with pytest.raises(SystemExit, match="dupr"):
        dilo.main(dilo.get_args(SMALL + ["--output-dir", str(tmp_path)]))


def test_nan_loss_stops_with_iteration(tmp_path):
    with pytest.raises(SystemExit, match="iteration"):
        dilo.main(dilo.get_args(SMALL + ["--lr", "1e30", "--steps", "3", "--output-dir", str(tmp_path)]))
    assert not (tmp_path / "checkpoint.pth").exists()


def test_dilo_preview(tmp_path):
    dilo.main(dilo.get_args(["--tiny", "--preview", "8", "--output-dir", str(tmp_path)]))
    sheet = Image.open(tmp_path / "preview.png")
    assert sheet.size == (6 * 128, 16 + 8 * 128)


def test_dilo_saliency_dir_and_folder_data(tmp_path):
    common.write_toy_world(str(tmp_path / "data"), 40, "train", image_size=48, saliency_dir=str(tmp_path / "sal"))
    args = dilo.get_args(SMALL + ["--data", str(tmp_path / "data"), "--saliency", str(tmp_path / "sal"),
                                  "--paste-prob", "1", "--blend", "none", "--background", "dataset"])
    dataset = dilo.CopyPasteTwoViews(common.open_source(args.data, 0, 0), args)
    image, mask, pasted, _ = dataset.sample(3)
    assert mask is not None and all(was for _, was in pasted)
    on = np.asarray(mask) >= 128
    assert np.array_equal(np.asarray(pasted[0][0])[on], np.asarray(image)[on])
    dilo.main(dilo.get_args(SMALL + ["--data", str(tmp_path / "data"), "--saliency", str(tmp_path / "sal"),
                                     "--steps", "2", "--output-dir", str(tmp_path / "run")]))
    assert (tmp_path / "run" / "backbone.pth").exists()


def test_two_processes_identical_ranks(tmp_path):
    run_two_ranks("dilo", "DiLo", 1, 29611, ["--steps", "4", "--batch-size", "16", "--image-size", "32"], tmp_path)


# ---------------------------------------------------------------------------------------
# dilo.py: RBD saliency, --make-saliency, --saliency rbd, --diagnose
# ---------------------------------------------------------------------------------------


def _rbd_fbeta_mae(saliency, gt, beta2=0.3):
    """F-beta at the adaptive threshold 2 x mean saliency (Achanta et al. 2009), and MAE."""
    predicted = saliency >= min(2 * saliency.mean(), 1.0)
    hits = (predicted & gt).sum()
    precision, recall = hits / max(predicted.sum(), 1), hits / max(gt.sum(), 1)
    f_beta = (1 + beta2) * precision * recall / max(beta2 * precision + recall, 1e-12)
    return f_beta, np.abs(saliency - gt).mean()


def _rbd_centre_prior(h, w, sigma=0.25):
    y, x = np.mgrid[0:h, 0:w]
    return np.exp(-(((y + 0.5) / h - 0.5) ** 2 + ((x + 0.5) / w - 0.5) ** 2) / (2 * sigma ** 2))


def test_rbd_beats_centre_prior_on_toy_world():
    """200 toy images of 96..128 px: RBD is far better than a centred Gaussian (README numbers)."""
    world, rbd, centre = common.ToyWorld(200, 128), [], []
    for i in range(len(world)):
        image, target = world[i]
        gt = np.asarray(target["mask"]) >= 128
        saliency = dilo.rbd_saliency(image)
        assert saliency.shape == gt.shape and saliency.min() >= 0 and saliency.max() <= 1
        rbd.append(_rbd_fbeta_mae(saliency, gt))
        centre.append(_rbd_fbeta_mae(_rbd_centre_prior(*gt.shape), gt))
    (f_rbd, mae_rbd), (f_centre, mae_centre) = np.mean(rbd, 0), np.mean(centre, 0)
    print(f"RBD F-beta {f_rbd:.3f} MAE {mae_rbd:.3f}; centre prior F-beta {f_centre:.3f} MAE {mae_centre:.3f}")
    assert f_rbd > f_centre + 0.15 and mae_rbd < mae_centre - 0.1


def test_rbd_superpixels_follow_edges_and_geodesics_are_shortest_paths():
    rgb = np.zeros((90, 120, 3), dtype=np.uint8)
    rgb[:, :50] = (200, 30, 30)  # a vertical colour edge at x = 50, off the SLIC grid
    rgb[:, 50:] = (30, 30, 200)
    labels = dilo.slic(dilo.rgb_to_lab(rgb), 40)
    assert 30 <= labels.max() + 1 <= 50
    for label in range(labels.max() + 1):  # no superpixel crosses the edge
        columns = np.nonzero(labels == label)[1]
        assert (columns < 50).all() or (columns >= 50).all()
    rng = np.random.default_rng(0)
    weights = np.where(rng.random((12, 12)) < 0.3, rng.random((12, 12)), np.inf)
    weights = np.minimum(weights, weights.T)
    reference = np.where(np.eye(12, dtype=bool), 0, weights)
    for _ in range(12):  # Bellman-Ford relaxation until nothing changes
        reference = np.minimum(reference, (reference[:, :, None] + weights[None]).min(1))
    assert np.allclose(dilo.all_pairs_shortest_paths(weights), reference)
    flat = dilo.rbd_saliency(Image.new("RGB", (40, 30), (90, 90, 90)))  # nothing salient: no NaN
    assert flat.shape == (30, 40) and np.all(flat == 0)


def test_rbd_make_saliency_is_resumable_and_survives_bad_files(tmp_path):
    data = common.write_toy_world(str(tmp_path / "data"), 5, image_size=64)
    (tmp_path / "data" / "train" / "broken.jpg").write_bytes(b"not an image")
    out = str(tmp_path / "masks")
    args = dilo.get_args(["--make-saliency", "--data", data, "--saliency-out", out, "--workers", "0"])
    first = dilo.main(args)
    assert first["written"] == 5 and first["existed"] == 0 and first["failed"][0].startswith("broken.jpg")
    names = sorted(os.listdir(out))
    assert names == [f"{i:06d}.png" for i in range(5)]  # no temporary files, nothing for the bad one
    for name in names:
        image = Image.open(tmp_path / "data" / "train" / name)
        assert Image.open(os.path.join(out, name)).size == image.size
    os.remove(os.path.join(out, "000003.png"))  # as if interrupted before this mask
    stamp = os.stat(os.path.join(out, "000000.png")).st_mtime_ns
    second = dilo.main(args)
    assert second["written"] == 1 and second["existed"] == 4 and len(second["failed"]) == 1
    assert os.path.exists(os.path.join(out, "000003.png"))
    assert os.stat(os.path.join(out, "000000.png")).st_mtime_ns == stamp  # finished masks not recomputed


def test_rbd_dataset_backgrounds_avoid_salient_regions():
    """--background dataset: crops come from where the estimated (RBD) saliency is low."""
    rgb = np.random.default_rng(0).integers(110, 140, (120, 160, 3)).astype(np.uint8)
    rgb[30:90, 20:80] = (230, 20, 20)  # the only salient object
    args = dilo.get_args(["--tiny", "--saliency", "rbd", "--background", "dataset"])
    dataset = dilo.CopyPasteTwoViews([(Image.fromarray(rgb), {})], args)
    red = rgb[..., 0] > 200
    torch.manual_seed(0)
    chosen = np.mean([(np.asarray(dataset.low_saliency_crop((60, 60)))[..., 0] > 200).mean() for _ in range(10)])
    at_random = np.mean([red[y:y + 60, x:x + 60].mean() for y in range(0, 61, 5) for x in range(0, 101, 5)])
    assert at_random > 0.2 and chosen < 0.25 * at_random


@pytest.fixture(scope="module")
def _rbd_tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rbd_tiny"))
    dilo.main(dilo.get_args(["--tiny", "--epochs", "1", "--saliency", "rbd", "--steps", "2", "--workers", "0",
                             "--output-dir", out, "--resume", "none"]))
    return out


def test_rbd_tiny_trains_with_on_the_fly_masks(_rbd_tiny_run):
    records = [json.loads(line) for line in open(os.path.join(_rbd_tiny_run, "log.jsonl"))]
    epoch = records[-1]
    assert epoch["no_mask"] == 0 and 0 < epoch["pasted"] < 1  # every image got an RBD mask, p = 0.3 pasted
    assert os.path.exists(os.path.join(_rbd_tiny_run, "backbone.pth"))


def test_rbd_diagnosis_png_for_backbone_and_checkpoint(_rbd_tiny_run):
    found = []
    for name in ("backbone.pth", "checkpoint.pth"):
        out = os.path.join(_rbd_tiny_run, name + "_diagnosis")
        args = dilo.get_args(["--tiny", "--diagnose", os.path.join(_rbd_tiny_run, name), "--workers", "0", "--output-dir", out])
        found.append(dilo.main(args))
        sheet = Image.open(os.path.join(out, "diagnosis.png"))
        assert sheet.size == (5 * 128, 16 + 6 * 128)  # query, gradient, 3 neighbours; 6 queries
    (neighbours, top1), (neighbours_ckpt, top1_ckpt) = found
    assert neighbours.shape == (6, 3) and torch.equal(neighbours, neighbours_ckpt)  # the same weights either way
    assert top1 == top1_ckpt and 0 < top1 <= 1  # view retrieval: seeded views, so the same number


# ---------------------------------------------------------------------------------------
# dupr.py
# ---------------------------------------------------------------------------------------

import dupr  # noqa: E402

_DUPR_SMALL = ["--tiny", "--image-size", "32", "--batch-size", "8", "--queue-size", "20", "--bn-batch", "4",
               "--workers", "0", "--print-freq", "1"]


def _dupr_coordinate_image(h, w):
    """(3, h, w) float: channel 0 = x, channel 1 = y of each pixel's centre, in original pixels."""
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return torch.stack([xs, ys, torch.zeros_like(xs)])


def _dupr_random_pairs(n, seed=0):
    """n pairs of views made by the training augmentation (colour off) from coordinate images:
    originals 30..500 px a side (aspect up to 16:1), crop aspect ratios 1:4..4:1, flips, and
    view sizes that differ between the two views and need not be square."""
    torch.manual_seed(seed)
    pairs = []
    for i in range(n):
        h, w = torch.randint(30, 500, (2,)).tolist()
        image = _dupr_coordinate_image(h, w)
        sizes = [int(torch.randint(24, 256, ())) if i % 2 else tuple(torch.randint(24, 256, (2,)).tolist()) for _ in range(2)]
        views = [dupr.MoCoV2ViewWithBox(size, ratio=(1 / 4, 4), colour=False)(image) for size in sizes]
        pairs.append([(v, torch.tensor([crop], dtype=torch.float32), torch.tensor([flipped])) for v, crop, flipped in views])
    return pairs


def _dupr_grid_coordinates(pair, S, flip_boxes=True, flip_grids=True):
    """RoIAlign (stride 1) of B in both views -> the two (2, S, S) grids of original (x, y), the
    cell size (2, 1, 1), the coarser view's pixel size in original pixels (2, 1, 1), B, valid, B_v.
    flip_boxes/flip_grids=False build deliberately wrong mappings that ignore the flips."""
    (v1, crop_1, flip_1), (v2, crop_2, flip_2) = pair
    size_1, size_2 = (v1.shape[-1], v1.shape[-2]), (v2.shape[-1], v2.shape[-2])
    no = torch.tensor([False])
    B_1, B_2, valid = dupr.intersection_in_views(crop_1, crop_2, flip_1 if flip_boxes else no,
                                                 flip_2 if flip_boxes else no, size_1, size_2)
    g_1 = dupr.roi_grid(v1[None], B_1, flip_1 if flip_grids else no, S, stride=1)[0, :2]  # (2, S, S)
    g_2 = dupr.roi_grid(v2[None], B_2, flip_2 if flip_grids else no, S, stride=1)[0, :2]
    B = torch.cat([torch.maximum(crop_1[0, :2], crop_2[0, :2]), torch.minimum(crop_1[0, 2:], crop_2[0, 2:])])
    cell = ((B[2:] - B[:2]) / S)[:, None, None]
    view_pixel = torch.maximum((crop_1[0, 2:] - crop_1[0, :2]) / torch.tensor(size_1),
                               (crop_2[0, 2:] - crop_2[0, :2]) / torch.tensor(size_2))[:, None, None]
    return g_1, g_2, cell, view_pixel, B, bool(valid), (B_1[0], B_2[0])


def test_dupr_geometry_patch_grids_agree_in_both_views():
    """The heart of DUPR: cell (r, c) of B's S x S grid shows the same original pixels in both views."""
    pairs = _dupr_random_pairs(300)
    resolved, one_flipped, mirror_moves_box = 0, 0, 0
    wrong_caught = {"boxes": 0, "grids": 0}
    for pair in pairs:
        for S in (7, 14):
            g_1, g_2, cell, view_pixel, B, valid, boxes = _dupr_grid_coordinates(pair, S)
            if not valid:
                continue
            # Where each cell is: the centres of B's S x S cells in the original image.
            centres = torch.stack(torch.meshgrid(B[1] + (torch.arange(S) + 0.5) * cell[1, 0, 0],
                                                 B[0] + (torch.arange(S) + 0.5) * cell[0, 0, 0], indexing="ij")[::-1])
            # Always within half an original pixel plus one view pixel: a view repeats its crop's
            # edge pixels over the outer half pixel, and RoIAlign clamps at the view's border.
            tolerance = 0.5 + view_pixel
            assert ((g_1 - centres).abs() <= tolerance).all() and ((g_2 - g_1).abs() <= tolerance).all()
            if (cell >= 2 * view_pixel.clamp(min=1)).all():  # cells of 2+ pixels in all images: a tenth of a cell
                resolved += 1
                assert ((g_1 - g_2).abs() <= 0.1 * cell).all() and ((g_1 - centres).abs() <= 0.1 * cell).all()
                if bool(pair[0][2]) != bool(pair[1][2]):
                    one_flipped += 1
                    for wrong in ("boxes", "grids"):  # ignore the flip in the boxes, or in the grid
                        g_1w, g_2w, *_, unmirrored = _dupr_grid_coordinates(
                            pair, S, flip_boxes=wrong != "boxes", flip_grids=wrong != "grids")
                        caught = bool(((g_1w - g_2w).abs() > 0.1 * cell).any())
                        if wrong == "grids":
                            wrong_caught[wrong] += caught
                            continue
                        # Not mirroring B_v changes little where B_v is centred in its view (B = a whole view).
                        shift = max(float((u - v).abs().max() / (v[2] - v[0]) * S) for u, v in zip(unmirrored, boxes))
                        if shift > 0.2:  # cells
                            wrong_caught[wrong] += caught
                            mirror_moves_box += 1
    assert resolved >= 300 and one_flipped >= 100 and mirror_moves_box >= 100  # hundreds of pairs, many flipped
    assert wrong_caught == {"boxes": mirror_moves_box, "grids": one_flipped}  # every wrong mapping fails


def test_dupr_no_overlap_pairs_are_skipped_and_counted():
    args = dupr.get_args(_DUPR_SMALL)
    torch.manual_seed(0)
    model = dupr.DUPR(args)
    im_q, im_k = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    crop_q = torch.tensor([[0, 0, 50, 50]] * 8, dtype=torch.float32)
    crop_k = crop_q + torch.tensor([[20, 10, 20, 10]] * 6 + [[50, 0, 50, 0], [60, 70, 60, 70]], dtype=torch.float32)
    flips = torch.tensor([False, True] * 4)
    B_q, B_k, valid = dupr.intersection_in_views(crop_q, crop_k, flips, ~flips, (32, 32), (32, 32))
    assert valid.tolist() == [True] * 6 + [False] * 2  # touching at an edge is no overlap
    assert torch.allclose(B_q[0], torch.tensor([20, 10, 50, 50]) * 32 / 50)
    assert torch.allclose(B_k[0], torch.tensor([32 - 30 * 32 / 50, 0, 32, 40 * 32 / 50]))  # mirrored in a flipped view
    pointers = {m: int(queue.ptr) for m, queue in model.patch_queues.items()}
    loss, terms = model(im_q, im_k, crop_q, crop_k, flips, ~flips)
    loss.backward()
    assert abs(float(terms["no_overlap"]) - 0.25) < 1e-6 and torch.isfinite(loss)
    expected = sum(a * terms[f"image_{m}"] for m, a in zip(dupr.LEVELS, args.alpha) if a > 0)
    expected += sum(b * terms[f"patch_{m}"] for m, b in zip(dupr.LEVELS, args.beta) if b > 0)
    assert torch.allclose(loss, expected)  # eq. 2
    for m, queue in model.patch_queues.items():  # 8 (256 per 256 images) of the 6 valid images' S*S cells
        S = model.encoder_q.S[m]
        assert int(queue.ptr) == (pointers[m] + min(args.patch_enqueue * 8 // 256, 6 * S * S)) % args.queue_size
    # Eq. 7 as a mean over valid (image, position) queries, against a plain loop.
    r_q, r_k = (nn.functional.normalize(torch.randn(8, 9, 16), dim=2) for _ in range(2))
    queue = nn.functional.normalize(torch.randn(20, 16), dim=1)
    reference = np.mean([-torch.log_softmax(torch.cat([(r_q[i, p] @ r_k[i, p])[None], r_q[i, p] @ queue.t()]) / 0.2, 0)[0].item()
                         for i in range(6) for p in range(9)])
    assert abs(float(dupr.patch_info_nce(r_q, r_k, valid, queue, 0.2)[0]) - reference) < 1e-5
    # A batch without any overlap trains on the image loss only; no patch keys are enqueued.
    far = crop_q + 100
    keys = {m: queue.keys.clone() for m, queue in model.patch_queues.items()}
    loss, terms = model(im_q, im_k, crop_q, far, flips, flips)
    loss.backward()
    assert float(terms["no_overlap"]) == 1 and not any("patch_" in name for name in terms)  # not logged as 0
    assert all(torch.equal(keys[m], model.patch_queues[m].keys) for m in keys)


def test_dupr_reduces_to_moco_v2_of_dilo():
    """--alpha 0 0 0 1 --beta 0 0 0 0 is MoCo v2: the same loss, gradients and queue as
    dilo.py --paste-prob 0 with the same weights, queue and batch."""
    dupr_args = dupr.get_args(_DUPR_SMALL + ["--alpha", "0", "0", "0", "1", "--beta", "0", "0", "0", "0"])
    dilo_args = dilo.get_args(SMALL + ["--paste-prob", "0"])
    torch.manual_seed(0)
    ours, theirs = dupr.DUPR(dupr_args), dilo.DiLo(dilo_args)
    rename = {"image_heads.conv5.": "head.", "image_queues.conv5.": "queue."}
    translate = lambda key: next((key.replace(a, b) for a, b in rename.items() if a in key), key)
    assert sorted(translate(key) for key in ours.state_dict()) == sorted(theirs.state_dict())  # nothing else
    ours.load_state_dict({key: theirs.state_dict()[translate(key)] for key in ours.state_dict()})
    dataset = dupr.TwoViewsWithBoxes(common.ToyWorld(8, 36), dupr_args)
    batch = [torch.stack(column) for column in zip(*[dataset[i] for i in range(8)])]
    for step in range(2):  # the second step also sees the EMA update and the enqueued keys
        torch.manual_seed(step)  # the shuffle-BN permutation
        loss_ours, _ = ours(*batch)
        torch.manual_seed(step)
        loss_theirs, _ = theirs(batch[0], batch[1], torch.zeros(8, 2, dtype=torch.bool), torch.ones(8, dtype=torch.bool))
        assert abs(loss_ours.item() - loss_theirs.item()) < 1e-5
        ours.zero_grad(), theirs.zero_grad()
        loss_ours.backward(), loss_theirs.backward()
        for key, value in ours.encoder_q.named_parameters():
            assert torch.allclose(value.grad, theirs.encoder_q.get_parameter(translate(key)).grad, atol=1e-5), key
    assert torch.allclose(ours.image_queues["conv5"].keys, theirs.queue.keys, atol=1e-6)


@pytest.fixture(scope="module")
def _dupr_tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dupr_tiny")
    dupr.main(dupr.get_args(["--tiny", "--steps", "2", "--epochs", "1", "--output-dir", str(out), "--workers", "0"]))
    return out


def test_dupr_backbone_loads_into_torchvision(_dupr_tiny_run):
    state = torch.load(_dupr_tiny_run / "backbone.pth", weights_only=True)
    net = torchvision.models.resnet18()
    result = net.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    model = dupr.DUPR(dupr.get_args(["--tiny"]))
    model.load_state_dict(torch.load(_dupr_tiny_run / "checkpoint.pth", weights_only=True)["model"])
    net.eval(), model.eval()
    x = torch.randn(2, 3, 64, 64)
    c5 = nn.Sequential(*list(net.children())[:-2])(x)
    assert torch.allclose(c5, model.encoder_q.backbone(x)[-1], atol=1e-5)


def test_dupr_exact_resume(tmp_path, monkeypatch):
    """2 epochs in one run == killed during epoch 2, then the same command rerun (all six queues)."""
    once, twice = killed_and_resumed(dupr, _DUPR_SMALL + ["--steps", "2"], tmp_path, monkeypatch)
    queues = [key for key in once["model"] if "_queues." in key]  # keys and pointers
    assert len([key for key in queues if key.endswith(".keys")]) == 6
    for key in queues:
        assert torch.equal(once["model"][key], twice["model"][key]), key


def test_dupr_preview(tmp_path):
    dupr.main(dupr.get_args(["--tiny", "--preview", "4", "--output-dir", str(tmp_path)]))
    assert Image.open(tmp_path / "preview.png").size == (3 * 160, 16 + 4 * 160)


def test_dupr_two_processes_identical_ranks(tmp_path):
    run_two_ranks("dupr", "DUPR", 6, 29621, ["--steps", "3", "--batch-size", "16", "--image-size", "32"], tmp_path)


# ---------------------------------------------------------------------------------------
# detco.py
# ---------------------------------------------------------------------------------------

import math  # noqa: E402

import torch.nn.functional as F  # noqa: E402

import detco  # noqa: E402


def test_detco_jigsaw_patches_are_windows_of_their_cells():
    """Before colour: patch = the pixels of a 64 x 64 window inside its 85 x 85 cell of the
    255 x 255 crop (itself the recorded box of the original, resized, maybe flipped); the
    recorded permutation puts the patches back in cell order."""
    assert detco.local_sizes(224) == (255, 85, 64) and detco.local_sizes(64) == (72, 24, 18)
    dataset = detco.GlobalLocalViews(common.ToyWorld(6, 256), detco.get_args(["--tiny", "--image-size", "224"]))
    dataset.colour = lambda image: image  # geometry only; to_input (ToTensor, Normalize) is per pixel
    torch.manual_seed(0)
    offsets, perms = set(), set()
    for index in range(6):
        image, _, jigsaws = dataset.sample(index)
        for jigsaw in jigsaws:
            crop = image.crop(jigsaw["box"]).resize((255, 255), Image.BILINEAR)
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT) if jigsaw["flipped"] else crop
            assert np.array_equal(np.asarray(jigsaw["crop"]), np.asarray(crop))
            in_cell_order = jigsaw["patches"][jigsaw["perm"].argsort()]  # (9, 3, 64, 64)
            for cell, ((y, x), patch) in enumerate(zip(jigsaw["windows"].tolist(), in_cell_order)):
                row, column = divmod(cell, 3)
                assert 85 * row <= y <= y + 64 <= 85 * (row + 1) and 85 * column <= x <= x + 64 <= 85 * (column + 1)
                assert torch.equal(patch, dataset.to_input(crop.crop((x, y, x + 64, y + 64))))
                offsets.add((y - 85 * row, x - 85 * column))
            perms.add(tuple(jigsaw["perm"].tolist()))
    assert len(offsets) > 50 and len(perms) == 12  # windows and orders are random
    view_q, view_k, patches_q, patches_k = dataset[0]
    assert view_q.shape == view_k.shape == (3, 224, 224) and patches_q.shape == patches_k.shape == (9, 3, 64, 64)


def _detco_embed(encoder, image, patches):
    """Loop reference of Encoder.forward for ONE image: 4 global then 4 local embeddings (128,)."""
    g = [F.normalize(head(c[0].mean(dim=(1, 2))), dim=0)
         for head, c in zip(encoder.global_heads, encoder.backbone(image[None]))]
    per_patch = [encoder.backbone(patch[None]) for patch in patches]  # 9 x 4 levels
    l = [F.normalize(head(torch.cat([per_patch[j][level][0].mean(dim=(1, 2)) for j in range(9)])), dim=0)
         for level, head in enumerate(encoder.local_heads)]
    return g + l


def _detco_info_nce(q, k, queue, tau):
    """-log softmax of the positive among [q.k, q.queue_1 .. q.queue_K] / tau, one sample at a time."""
    losses, hits = [], []
    for q_i, k_i in zip(q, k):
        l_pos = float(torch.dot(q_i, k_i))
        l_neg = [float(torch.dot(q_i, key)) for key in queue]
        losses.append(-l_pos / tau + math.log(sum(math.exp(s / tau) for s in [l_pos] + l_neg)))
        hits.append(l_pos > max(l_neg))
    return sum(losses) / len(losses), sum(hits) / len(hits)


def test_detco_12_terms_equal_loop_reference():
    """Fixed weights, eval-mode BN (so one image at a time equals the batch): the 12 terms, the
    total, and what each of the 8 queues receives, against plain loops over images and patches."""
    torch.manual_seed(0)
    args = detco.get_args(SMALL + ["--arch", "resnet18", "--level-weights", "0.1", "0.4", "0.7", "1.0"])
    model = detco.DetCo(args).eval()
    N, S, p = 4, args.image_size, detco.local_sizes(args.image_size)[2]
    im_q, im_k, patches_q, patches_k = torch.randn(N, 3, S, S), torch.randn(N, 3, S, S), torch.randn(N, 9, 3, p, p), torch.randn(N, 9, 3, p, p)
    queues = [queue.keys.clone() for queue in model.queues]
    with torch.no_grad():
        loss, terms = model(im_q, im_k, patches_q, patches_k)
        q = list(zip(*[_detco_embed(model.encoder_q, im_q[i], patches_q[i]) for i in range(N)]))  # 8 x N x (128,)
        k = list(zip(*[_detco_embed(model.encoder_k, im_k[i], patches_k[i]) for i in range(N)]))  # f_k after its EMA step
    total = 0.0
    for level, (name, w) in enumerate(zip(detco.LEVELS, args.level_weights)):
        for term, query, key, queue in (("g2g", q[level], k[level], queues[level]),
                                        ("l2g", q[4 + level], k[level], queues[level]),
                                        ("l2l", q[4 + level], k[4 + level], queues[4 + level])):
            value, acc = _detco_info_nce(query, key, queue, args.temperature)
            assert abs(float(terms[f"{term}_{name}"]) - value) < 1e-4, (term, name)
            assert float(terms[f"acc_{term}_{name}"]) == acc
            total += w * value
    assert len(terms) == 1 + 24 and abs(float(loss) - total) < 1e-4
    for queue, keys in zip(model.queues, k):  # g keys -> Queue_g, l keys -> Queue_l, of their level
        assert torch.allclose(queue.keys[:N], torch.stack(keys), atol=1e-5) and int(queue.ptr) == N


@pytest.fixture(scope="module")
def _detco_small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("detco_small")
    detco.main(detco.get_args(SMALL + ["--steps", "2", "--epochs", "1", "--output-dir", str(out)]))
    return out


def test_detco_backbone_loads_into_torchvision_and_logs_every_term(_detco_small_run):
    state = torch.load(_detco_small_run / "backbone.pth", weights_only=True)
    net = torchvision.models.resnet18()
    result = net.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    model = detco.DetCo(detco.get_args(SMALL))
    model.load_state_dict(torch.load(_detco_small_run / "checkpoint.pth", weights_only=True)["model"])
    net.eval(), model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(nn.Sequential(*list(net.children())[:-2])(x), model.encoder_q.backbone(x)[-1], atol=1e-5)
    record = read_log(_detco_small_run / "log.jsonl")[0]
    for level in detco.LEVELS:
        for term in ("g2g", "l2g", "l2l"):
            assert f"{term}_{level}" in record and f"acc_{term}_{level}" in record


def test_detco_exact_resume(tmp_path, monkeypatch):
    """2 epochs in one run == killed during epoch 2, then the same command rerun."""
    once, twice = killed_and_resumed(detco, SMALL + ["--steps", "2"], tmp_path, monkeypatch)
    for i in range(8):
        assert torch.equal(once["model"][f"queues.{i}.keys"], twice["model"][f"queues.{i}.keys"])


def test_detco_preview(tmp_path):
    detco.main(detco.get_args(["--tiny", "--preview", "3", "--output-dir", str(tmp_path)]))
    assert Image.open(tmp_path / "preview.png").size == (5 * 128, 16 + 3 * 128)


def test_detco_two_processes_identical_ranks(tmp_path):
    run_two_ranks("detco", "DetCo", 8, 29631,
                  ["--steps", "3", "--batch-size", "8", "--image-size", "32", "--bn-batch", "2"], tmp_path)


# ---------------------------------------------------------------------------------------
# insloc.py
# ---------------------------------------------------------------------------------------

import insloc  # noqa: E402


def _insloc_solid_source(n=5):
    """Images of one flat colour each (colour = index), of varied sizes: every pixel tells its image."""
    return [(Image.new("RGB", (40 + 13 * i, 70 - 7 * i), (10 * i, 255 - 10 * i, 3 * i)), {}) for i in range(n)]


def test_insloc_composition_pixels_boxes_backgrounds():
    """Inside the box: the resized foreground crop; outside: the background; both mirrored together."""
    S = 64
    args = insloc.get_args(["--tiny", "--image-size", str(S)])
    torch.manual_seed(0)
    for source in (_insloc_solid_source(), common.ToyWorld(6, 73)):
        dataset = insloc.InstanceComposition(source, args)
        flips, ratios = set(), []
        for index in list(range(len(source))) * 8:
            image, views = dataset.sample(index)
            assert np.array_equal(np.asarray(image), np.asarray(source[index][0]))
            backgrounds = [v["background"] for v in views]
            assert backgrounds[0] != backgrounds[1] and index not in backgrounds  # footnote 2
            for view in views:
                x1, y1, x2, y2 = view["box"].tolist()
                assert all(float(c).is_integer() for c in (x1, y1, x2, y2)) and 0 <= x1 < x2 <= S and 0 <= y1 < y2 <= S
                x1, y1, x2, y2 = int(x1), int(y1), int(x2), int(y2)
                crop, background = np.asarray(view["crop"]), np.asarray(dataset.load_background(view["background"]))
                if view["flipped"]:
                    crop, background = crop[:, ::-1], background[:, ::-1]
                flips.add(view["flipped"])
                composite = np.asarray(view["composite"])
                assert crop.shape[:2] == (y2 - y1, x2 - x1) and 32 <= max(crop.shape[:2]) < 64
                inside = np.zeros((S, S), dtype=bool)
                inside[y1:y2, x1:x2] = True
                assert np.array_equal(composite[y1:y2, x1:x2], crop)
                assert np.array_equal(composite[~inside], background[~inside])
                if isinstance(source, list):  # flat colours: the crop really is the foreground image
                    assert (composite[inside] == np.asarray(image)[0, 0]).all()
                ratios.append((x2 - x1) / (y2 - y1))
        assert flips == {True, False}
        assert 1 / 3 - 0.1 < min(ratios) and max(ratios) < 3 + 0.3 and min(ratios) < 0.6 and max(ratios) > 1.7
    torch.manual_seed(1)
    _, views = dataset.sample(2)
    torch.manual_seed(1)
    im_q, im_k, box_q, box_q_aug, box_k = dataset[2]  # the loader's item is that sample, colour-augmented
    assert im_q.shape == im_k.shape == (3, S, S)
    assert torch.equal(box_q, views[0]["box"]) and torch.equal(box_k, views[1]["box"])
    assert torchvision.ops.box_iou(box_q[None], box_q_aug[None]) > 0.5
    with pytest.raises(SystemExit, match="at least 3"):
        insloc.InstanceComposition(_insloc_solid_source(2), args)


def _insloc_random_boxes(n, S, generator):
    """Boxes as the composition makes them: longer side in [S/2, S), aspect ratio in [1/3, 3]."""
    longer = torch.randint(S // 2, S, (n,), generator=generator).float()
    ratio = torch.exp(torch.empty(n).uniform_(-math.log(3), math.log(3), generator=generator))
    w = torch.where(ratio >= 1, longer, (longer * ratio).round().clamp_min(1))
    h = torch.where(ratio >= 1, (longer / ratio).round().clamp_min(1), longer)
    x, y = (torch.rand(n, generator=generator) * (S - w + 1)).floor(), (torch.rand(n, generator=generator) * (S - h + 1)).floor()
    return torch.stack([x, y, x + w, y + h], dim=1)


def test_insloc_box_augmentation_overlaps_and_varies():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    for S, count in ((256, 2000), (64, 500)):
        anchors = insloc.make_anchors(S)
        assert anchors.shape == (16 * 16 * 20, 4) and anchors.min() >= 0 and anchors.max() <= S
        chosen, fallbacks = set(), 0
        for box in _insloc_random_boxes(count, S, generator):
            augmented = insloc.augment_box(box, anchors)
            iou = torchvision.ops.box_iou(box[None], augmented[None]).item()
            best = torchvision.ops.box_iou(box[None], anchors).max().item()
            assert iou > 0.5 or iou == best
            fallbacks += iou <= 0.5
            chosen.add(tuple(augmented.tolist()))
        assert fallbacks < 0.01 * count and len(chosen) > count / 4  # many different anchors
    box = torch.tensor([50.0, 60.0, 200.0, 180.0])
    draws = {tuple(insloc.augment_box(box, insloc.make_anchors(256)).tolist()) for _ in range(100)}
    assert len(draws) >= 10  # the choice for one box is random, not always the same anchor


@pytest.mark.parametrize("variant", ["c4", "fpn"])
def test_insloc_shuffle_bn_moves_boxes_with_images(variant):
    """Shuffled, chunked key forward == plain forward when BN uses fixed statistics (eval)."""
    torch.manual_seed(0)
    args = insloc.get_args(["--tiny", "--image-size", "32", "--variant", variant])
    encoder = insloc.InsLoc(args).encoder_k.eval()
    x, boxes = torch.randn(6, 3, 32, 32), insloc.make_anchors(32)[torch.randint(5120, (6, 4))]  # (6, 4, 4)
    boxes = boxes[:, :len(encoder.levels)]
    shuffled = common.shuffled_key_forward(encoder, (x, boxes), bn_batch=4)
    assert shuffled.shape == (6, len(encoder.levels), 128)
    assert torch.allclose(shuffled, encoder(x, boxes), atol=1e-5)
    moved = encoder(x, boxes.roll(1, dims=0))  # another box per image changes the embedding
    assert (moved - shuffled).abs().max() > 1e-3


INSLOC_SMALL = ["--tiny", "--image-size", "32", "--batch-size", "8", "--queue-size", "20", "--bn-batch", "4",
                "--workers", "0", "--print-freq", "1"]


def test_insloc_exact_resume(tmp_path, monkeypatch):
    """2 epochs in one run == killed during epoch 2, then the same command rerun (C4: smaller files)."""
    once, twice = killed_and_resumed(insloc, INSLOC_SMALL + ["--steps", "2"], tmp_path, monkeypatch)
    assert once["optimizer"]["param_groups"][0]["nesterov"]
    assert torch.equal(once["model"]["queues.0.keys"], twice["model"]["queues.0.keys"])
    with pytest.raises(SystemExit, match="variant c4"):
        insloc.main(insloc.get_args(INSLOC_SMALL + ["--variant", "fpn", "--output-dir", str(tmp_path / "once")]))


@pytest.fixture(scope="module")
def _insloc_fpn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("insloc_fpn")
    insloc.main(insloc.get_args(INSLOC_SMALL + ["--variant", "fpn", "--steps", "2", "--epochs", "1", "--output-dir", str(out)]))
    return out


def test_insloc_fpn_logs_levels_and_sums_losses(_insloc_fpn_run):
    record = read_log(_insloc_fpn_run / "log.jsonl")[0]
    levels = ("p2", "p3", "p4", "p5")
    assert all(f"loss_{p}" in record and f"acc_{p}" in record for p in levels)
    assert record["loss"] == pytest.approx(sum(record[f"loss_{p}"] for p in levels), rel=1e-5)
    assert record["acc"] == pytest.approx(np.mean([record[f"acc_{p}"] for p in levels]), rel=1e-5)
    model = torch.load(_insloc_fpn_run / "checkpoint.pth", weights_only=True)["model"]
    assert all(f"queues.{level}.keys" in model for level in range(4))  # one queue per level


def test_insloc_fpn_backbone_loads_into_torchvision(_insloc_fpn_run):
    """backbone.pth = ResNet + fpn.* + box_head.*, each loading strictly into torchvision's module."""
    state = torch.load(_insloc_fpn_run / "backbone.pth", weights_only=True)
    resnet = torchvision.models.resnet18()
    result = resnet.load_state_dict({k: v for k, v in state.items() if not k.startswith(("fpn.", "box_head."))},
                                    strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    fpn = torchvision.ops.FeaturePyramidNetwork([64, 128, 256, 512], 256, norm_layer=nn.BatchNorm2d)
    fpn.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("fpn.")}, strict=True)
    box_head = torchvision.models.detection.faster_rcnn.FastRCNNConvFCHead(
        (256, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d)
    box_head.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("box_head.")}, strict=True)
    assert len(state) == len(resnet.state_dict()) - 2 + len(fpn.state_dict()) + len(box_head.state_dict())
    model = torch.load(_insloc_fpn_run / "checkpoint.pth", weights_only=True)["model"]
    for key, value in fpn.state_dict().items():  # the query encoder's trained weights, not a fresh init
        assert torch.equal(value, model[f"encoder_q.fpn.{key}"])
    for key, value in box_head.state_dict().items():
        assert torch.equal(value, model[f"encoder_q.box_head.{key}"])


def test_insloc_head_lr_scale(_insloc_fpn_run):
    """--tiny --variant fpn trains the layers on the trunk at 0.01x the lr; the paper's recipe at 1x."""
    assert insloc.get_args(["--variant", "fpn"]).head_lr_scale == 1.0
    assert insloc.get_args(["--tiny"]).head_lr_scale == 1.0
    assert insloc.get_args(["--tiny", "--variant", "fpn", "--head-lr-scale", "0.5"]).head_lr_scale == 0.5
    trunk, heads = torch.load(_insloc_fpn_run / "checkpoint.pth", weights_only=True)["optimizer"]["param_groups"]
    assert (trunk["lr_scale"], heads["lr_scale"]) == (1.0, 0.01)
    assert heads["lr"] == pytest.approx(0.01 * trunk["lr"]) and trunk["lr"] > 0
    encoder = insloc.InsLoc(insloc.get_args(INSLOC_SMALL + ["--variant", "fpn"])).encoder_q
    assert len(trunk["params"]) == len(list(encoder.backbone.parameters()))
    assert len(heads["params"]) == len(list(encoder.parameters())) - len(trunk["params"])


def test_insloc_c4_trains_and_preview(tmp_path):
    insloc.main(insloc.get_args(INSLOC_SMALL + ["--steps", "2", "--epochs", "1", "--output-dir", str(tmp_path)]))
    state = torch.load(tmp_path / "backbone.pth", weights_only=True)
    result = torchvision.models.resnet18().load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    record = read_log(tmp_path / "log.jsonl")[-1]
    assert 0.5 < record["box_iou"] < 1 and "loss_p2" not in record  # augmented query boxes; one level
    insloc.main(insloc.get_args(["--tiny", "--preview", "4", "--output-dir", str(tmp_path)]))
    assert Image.open(tmp_path / "preview.png").size == (5 * 128, 16 + 4 * 128)


def test_insloc_two_processes_identical_ranks(tmp_path):
    run_two_ranks("insloc", "InsLoc", 1, 29641, ["--steps", "3", "--batch-size", "8", "--image-size", "32"], tmp_path)


@pytest.mark.parametrize("module, model_class, views_class, extra, term_count", [
    (dupr, dupr.DUPR, dupr.TwoViewsWithBoxes, [], 6), (detco, detco.DetCo, detco.GlobalLocalViews, [], 12),
    (insloc, insloc.InsLoc, insloc.InstanceComposition, ["--variant", "c4"], 0),  # one term: the total
    (insloc, insloc.InsLoc, insloc.InstanceComposition, ["--variant", "fpn"], 4)], ids=["dupr", "detco", "insloc-c4", "insloc-fpn"])
def test_every_loss_term_falls_on_fixed_views(module, model_class, views_class, extra, term_count):
    """Each logged loss term gets a gradient that lowers it: 25 steps on one fixed batch of 8 toy
    images (the method's own views, boxes and patches), K = 32, once the queue holds real keys.

    NOTE: lr 0.001 at batch 8 (0.032 per 256; the papers use 0.03-0.06) and m 0.99. At 30x that rate
    (lr 0.03) InsLoc-FPN's shared head and DetCo's local terms rise toward ln(K + 1) even here.
    """
    torch.manual_seed(0)
    args = module.get_args(["--tiny", "--image-size", "32", "--batch-size", "8", "--queue-size", "32", "--bn-batch", "8",
                            "--ema", "0.99", "--workers", "0"] + extra)
    model = model_class(args)
    dataset = views_class(common.ToyWorld(8, 36), args)
    batch = [torch.stack(column) for column in zip(*[dataset[i] for i in range(8)])]
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.001, momentum=0.9, weight_decay=1e-4)
    history = []
    for _ in range(25):
        loss, terms = model(*batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({name: float(value) for name, value in terms.items()})
    names = [name for name in history[0] if not name.startswith("acc") and name not in ("no_overlap", "box_iou")]
    assert len(names) == 1 + term_count  # the total and every term
    for name in names:  # 32 / 8 = 4 steps fill the queue with real keys
        full_queue, last = np.mean([h[name] for h in history[4:9]]), np.mean([h[name] for h in history[-5:]])
        assert last < full_queue - 0.05, (name, full_queue, last)


# ---------------------------------------------------------------------------------------
# detect_finetune.py: COCO / VOC evaluators, models and weight loading, training end to end
# ---------------------------------------------------------------------------------------

import detect_finetune as detect  # noqa: E402


def _detect_pycocotools(gt, results, iou_type):
    """COCOeval's 12 summary numbers and precision array for (gt dict, results list)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.array(evaluator.stats), evaluator.eval["precision"], evaluator.eval["recall"]


def _detect_random_box(rng, size):
    if rng.random() < 0.3:  # integer boxes, some exactly on the 32^2 / 96^2 area borders
        w, h = rng.choice([[32, 32], [16, 64], [96, 96], [48, 192], [4, 8]]) if rng.random() < 0.5 else rng.integers(1, size, 2)
        return [float(rng.integers(0, size)), float(rng.integers(0, size)), float(w), float(h)]
    x, y = rng.uniform(0, size, 2)
    return [x, y, rng.uniform(0.5, size), rng.uniform(0.5, size)]


def _detect_random_mask(rng, height, width):
    mask = np.zeros((height, width), np.uint8)
    for _ in range(rng.integers(0, 3)):
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        mask[y0:y0 + rng.integers(1, height), x0:x0 + rng.integers(1, width)] = 1
    mask ^= (rng.random((height, width)) < 0.05).astype(np.uint8)
    return mask


def _detect_jitter(rng, box, amount):
    return [max(0.0, v + rng.normal(0, amount)) for v in box[:2]] + [max(0.5, v + rng.normal(0, amount)) for v in box[2:]]


def _detect_random_case(seed, iou_type):
    """A random COCO problem with ties, crowds, empty images, categories without gt, borders."""
    rng = np.random.default_rng(seed)
    n_images, n_categories = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    size, (height, width) = 200, (int(rng.integers(6, 20)), int(rng.integers(6, 20)))
    images = [{"id": 10 * i + 3, "height": height, "width": width} for i in range(n_images)]
    categories = [{"id": c + 1, "name": str(c)} for c in range(n_categories + 1)]  # the last one never has gt
    annotations, results = [], []
    scores = [0.9, 0.5, 0.5, 0.3] if seed % 3 == 0 else None  # many exact ties
    crowd_rate = 0.25 if seed % 2 else 0.0
    for image in images:
        for _ in range(int(rng.integers(0, 6)) if rng.random() > 0.2 else 0):  # some images have no gt
            category = int(rng.integers(1, n_categories + 1))
            ann = {"id": len(annotations) + 1, "image_id": image["id"], "category_id": category,
                   "iscrowd": int(rng.random() < crowd_rate)}
            if iou_type == "bbox":
                ann["bbox"] = _detect_random_box(rng, size)
                ann["area"] = ann["bbox"][2] * ann["bbox"][3] if rng.random() < 0.7 else float(rng.choice([32 ** 2, 96 ** 2, 1e10]))
            else:
                mask = _detect_random_mask(rng, height, width)
                ann["segmentation"] = (common._uncompressed_rle(mask) if rng.random() < 0.5 or ann["iscrowd"]
                                       else detect.rle_encode(mask))
                ann["area"] = float(mask.sum()) if rng.random() < 0.7 else float(rng.choice([32 ** 2, 96 ** 2, 0]))
                ann["bbox"] = [0.0, 0.0, 1.0, 1.0]
            annotations.append(ann)
            for _ in range(int(rng.integers(0, 4))):  # detections near this gt, some duplicates
                det = {"image_id": image["id"], "category_id": category if rng.random() < 0.8 else int(rng.integers(1, n_categories + 2)),
                       "score": float(rng.choice(scores) if scores else rng.random())}
                if iou_type == "bbox":
                    det["bbox"] = _detect_jitter(rng, ann["bbox"], 0 if rng.random() < 0.2 else 10)
                else:
                    gt_mask = detect.mask_from_segmentation(ann["segmentation"], height, width)
                    det["segmentation"] = detect.rle_encode(gt_mask ^ (rng.random(gt_mask.shape) < 0.15))
                results.append(det)
        for _ in range(int(rng.integers(0, 5))):  # background detections, incl. the category without gt
            det = {"image_id": image["id"], "category_id": int(rng.integers(1, n_categories + 2)),
                   "score": float(rng.choice(scores) if scores else rng.random())}
            if iou_type == "bbox":
                det["bbox"] = _detect_random_box(rng, size)
            else:
                det["segmentation"] = detect.rle_encode(_detect_random_mask(rng, height, width))
            results.append(det)
    if seed % 7 == 0:  # more than 100 detections for one (image, category): the maxDets cut
        for _ in range(130):
            det = {"image_id": images[0]["id"], "category_id": 1, "score": float(rng.choice([0.2, 0.4, 0.6]))}
            if iou_type == "bbox":
                det["bbox"] = _detect_random_box(rng, size)
            else:
                det["segmentation"] = detect.rle_encode(_detect_random_mask(rng, height, width))
            results.append(det)
    if iou_type == "segm" and seed % 4 == 1:  # results that also carry a box: loadRes then uses box areas
        for det in results:
            det["bbox"] = [0.0, 0.0, float(rng.integers(1, 40)), float(rng.integers(1, 40))]
    rng.shuffle(results)
    return {"images": images, "annotations": annotations, "categories": categories}, results


def _detect_hand_cases():
    """Adversarial bbox cases: IoU exactly on thresholds, identical gts (ties), crowd only, >100 dets."""
    image = [{"id": 1, "height": 100, "width": 100}, {"id": 2, "height": 100, "width": 100}]
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    gt_box = lambda i, box, crowd=0, category=1, image_id=1: {"id": i, "image_id": image_id, "category_id": category,
                                                            "bbox": box, "area": box[2] * box[3], "iscrowd": crowd}
    det = lambda box, score, category=1, image_id=1: {"image_id": image_id, "category_id": category, "bbox": box, "score": score}
    return [
        # IoU exactly 0.5 and exactly 0.75
        ([gt_box(1, [0, 0, 10, 10]), gt_box(2, [50, 50, 30, 10])], [det([0, 0, 10, 20], 0.9), det([50, 50, 40, 10], 0.8)]),
        # two identical gts, two identical detections with equal scores
        ([gt_box(1, [5, 5, 20, 20]), gt_box(2, [5, 5, 20, 20])], [det([6, 5, 20, 20], 0.5), det([6, 5, 20, 20], 0.5)]),
        # a detection exactly between two gts takes the LAST one (COCOeval's `<`), freeing the first
        ([gt_box(1, [0, 0, 10, 10]), gt_box(2, [2, 0, 10, 10])], [det([1, 0, 10, 10], 0.9), det([0, 0, 10, 10], 0.8)]),
        # a crowd region swallowing many detections, plus one regular gt
        ([gt_box(1, [0, 0, 60, 60], crowd=1), gt_box(2, [10, 10, 20, 20])], [det([10 + i, 10, 20, 20], 0.9 - i / 100) for i in range(6)]),
        # only crowd gts: the category has no gt to recall (-1 everywhere)
        ([gt_box(1, [0, 0, 60, 60], crowd=1)], [det([0, 0, 30, 30], 0.7)]),
        # no detections at all; an empty second image
        ([gt_box(1, [0, 0, 32, 32]), gt_box(2, [0, 0, 96, 96], category=2)], []),
        # detections of a category without gt, on an image without gt
        ([gt_box(1, [0, 0, 32, 32])], [det([0, 0, 32, 32], 0.3), det([0, 0, 32, 32], 0.9, category=2, image_id=2)]),
        # 150 detections on one image and category, the true one ranked 120th
        ([gt_box(1, [40, 40, 20, 20])], [det([0, 0, 5 + i % 7, 5], 0.99 - i / 1000) for i in range(150)] + [det([40, 40, 20, 20], 0.87)]),
        # tiny and zero-size boxes
        ([gt_box(1, [10, 10, 0.5, 0.5]), gt_box(2, [20, 20, 0, 5])], [det([10, 10, 0.5, 0.5], 0.5), det([20, 20, 0, 5], 0.6)]),
    ], image, categories


def test_detect_coco_bbox_matches_pycocotools():
    cases = [_detect_random_case(seed, "bbox") for seed in range(60)]
    hand, images, categories = _detect_hand_cases()
    cases += [({"images": images, "annotations": a, "categories": categories}, r) for a, r in hand]
    for n, (gt, results) in enumerate(cases):
        if not results:  # pycocotools' loadRes cannot take an empty list: every AP is 0 then
            ours = detect.coco_evaluate(gt, results)
            assert all(s in (0.0, -1.0) for s in ours["stats"]), n
            continue
        stats, precision, recall = _detect_pycocotools(gt, results, "bbox")
        ours = detect.coco_evaluate(gt, results)
        np.testing.assert_allclose(ours["stats"], stats, atol=1e-6, err_msg=f"case {n}")
        np.testing.assert_allclose(ours["precision"], precision, atol=1e-6, err_msg=f"case {n}")
        np.testing.assert_allclose(ours["recall"], recall, atol=1e-6, err_msg=f"case {n}")


def test_detect_coco_segm_matches_pycocotools():
    for seed in range(50):
        gt, results = _detect_random_case(seed, "segm")
        if not results:
            continue
        stats, precision, recall = _detect_pycocotools(gt, results, "segm")
        ours = detect.coco_evaluate(gt, results, "segm")
        np.testing.assert_allclose(ours["stats"], stats, atol=1e-6, err_msg=f"seed {seed}")
        np.testing.assert_allclose(ours["precision"], precision, atol=1e-6, err_msg=f"seed {seed}")


def test_detect_rle_matches_pycocotools():
    from pycocotools import mask as mask_utils
    rng = np.random.default_rng(0)
    for n in range(40):
        height, width = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        mask = (rng.random((height, width)) < rng.choice([0.0, 0.02, 0.5, 1.0])).astype(np.uint8)
        if n % 5 == 0:  # long runs give multi-char and negative differences
            mask[:] = 0
            mask[: rng.integers(0, height + 1)] = 1
        reference = mask_utils.encode(np.asfortranarray(mask))
        ours = detect.rle_encode(mask)
        assert ours["counts"] == reference["counts"].decode() and ours["size"] == list(reference["size"])
        np.testing.assert_array_equal(detect.mask_from_segmentation(ours, height, width), mask)
        assert detect.segmentation_area(ours, height, width) == mask_utils.area(reference)
    big = np.zeros((1000, 900), np.uint8)
    big[300:700, 100:800] = 1
    assert detect.rle_encode(big)["counts"] == mask_utils.encode(np.asfortranarray(big))["counts"].decode()


def test_detect_voc_hand_worked():
    # class 1: image A has gt a1 and a difficult a2, image B has gt b1 -> 2 positives.
    # Detections by score: a1 exactly (TP), a1 again (duplicate: FP), a2 (difficult: ignored),
    # b1 with IoU 100/140 = 0.714 (TP at IoU thresholds .50-.70, FP from .75 on).
    gt = [{"boxes": [[0, 0, 9, 9], [50, 50, 69, 69]], "labels": [1, 1], "difficult": [0, 1]},
          {"boxes": [[0, 0, 9, 9]], "labels": [1], "difficult": [0]}]
    det = [{"boxes": [[0, 0, 9, 9], [0, 0, 9, 9], [50, 50, 69, 69]], "scores": [0.9, 0.8, 0.7], "labels": [1, 1, 1]},
           {"boxes": [[0, 0, 9, 13]], "scores": [0.6], "labels": [1]}]
    # t <= .70: recall [.5 .5 .5 1], precision [1 .5 .5 2/3] -> 11-point AP = (6 * 1 + 5 * 2/3) / 11 = 28/33
    # t >= .75: recall [.5 .5 .5 .5], precision [1 .5 .5 1/3] -> (6 * 1) / 11 = 6/11
    result = detect.voc_evaluate(gt, det, num_classes=1)
    assert result["AP50"] == pytest.approx(100 * 28 / 33, abs=1e-12)
    assert result["AP75"] == pytest.approx(100 * 6 / 11, abs=1e-12)
    assert result["AP"] == pytest.approx(100 * (5 * 28 / 33 + 5 * 6 / 11) / 10, abs=1e-12)
    # class 2 found perfectly: the mean over classes
    gt[1] = {"boxes": [[0, 0, 9, 9], [20, 20, 39, 29]], "labels": [1, 2], "difficult": [0, 0]}
    det[1] = {"boxes": [[0, 0, 9, 13], [20, 20, 39, 29]], "scores": [0.6, 0.1], "labels": [1, 2]}
    assert detect.voc_evaluate(gt, det, 2)["AP50"] == pytest.approx((100 * 28 / 33 + 100) / 2, abs=1e-12)


def test_detect_voc_threshold_is_strict_and_11_point():
    gt = [{"boxes": [[0, 0, 9, 9]], "labels": [1], "difficult": [0]}]
    half = [{"boxes": [[0, 0, 9, 19]], "scores": [1.0], "labels": [1]}]  # IoU 100/200 = 0.5 exactly
    assert detect.voc_evaluate(gt, half, 1)["AP50"] == 0.0  # voc_eval matches only if IoU > threshold
    more = [{"boxes": [[0, 0, 9, 18]], "scores": [1.0], "labels": [1]}]  # IoU 100/190
    assert detect.voc_evaluate(gt, more, 1)["AP50"] == pytest.approx(100.0)
    # 11 points r = 0, .1, ..., 1: recall reaches .25 at precision 1, then .75 at precision .6
    recall, precision = np.array([0.25, 0.25, 0.75]), np.array([1.0, 0.5, 0.6])
    assert detect.voc_ap_11_point(recall, precision) == pytest.approx((3 * 1.0 + 5 * 0.6) / 11, abs=1e-15)
    # only a difficult object: detecting it is neither a TP nor an FP, the class has no positives
    gt = [{"boxes": [[0, 0, 9, 9], [30, 30, 39, 39]], "labels": [1, 1], "difficult": [1, 0]}]
    det = [{"boxes": [[0, 0, 9, 9], [30, 30, 39, 39]], "scores": [0.9, 0.5], "labels": [1, 1]}]
    assert detect.voc_evaluate(gt, det, 1)["AP"] == pytest.approx(100.0)


def _detect_voc_eval_reference(gt, det, c, threshold):
    """detectron2's voc_eval loop, transcribed (with a stable sort), for class c: the AP fraction."""
    records = [{"bbox": np.asarray(g["boxes"], float)[np.asarray(g["labels"]) == c],
                "difficult": np.asarray(g["difficult"], bool)[np.asarray(g["labels"]) == c]} for g in gt]
    for r in records:
        r["det"] = [False] * len(r["bbox"])
    npos = sum(int((~r["difficult"]).sum()) for r in records)
    dets = [(i, s, b) for i, d in enumerate(det) for s, b, l in zip(d["scores"], d["boxes"], d["labels"]) if l == c]
    dets = [dets[i] for i in np.argsort([-s for _, s, _ in dets], kind="stable")]
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    for d, (i, _, bb) in enumerate(dets):
        R, ovmax = records[i], -np.inf
        if R["bbox"].size > 0:
            BBGT = R["bbox"]
            iw = np.maximum(np.minimum(BBGT[:, 2], bb[2]) - np.maximum(BBGT[:, 0], bb[0]) + 1.0, 0.0)
            ih = np.maximum(np.minimum(BBGT[:, 3], bb[3]) - np.maximum(BBGT[:, 1], bb[1]) + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                   + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0) - inters)
            overlaps = inters / uni
            ovmax, jmax = np.max(overlaps), np.argmax(overlaps)
        if ovmax > threshold:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d], R["det"][jmax] = 1.0, True
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec, prec = tp / float(npos), tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return sum((np.max(prec[rec >= t]) if np.sum(rec >= t) else 0) / 11.0 for t in np.arange(0.0, 1.1, 0.1))


def test_detect_voc_matches_voc_eval_loop():
    rng = np.random.default_rng(1)
    for case in range(20):
        gt, det = [], []
        for _ in range(int(rng.integers(1, 5))):
            n = int(rng.integers(0, 6))
            xy = rng.integers(0, 60, (n, 2)).astype(float)
            boxes = np.c_[xy, xy + rng.integers(0, 30, (n, 2))]
            gt.append({"boxes": boxes, "labels": rng.integers(1, 4, n), "difficult": rng.random(n) < 0.2})
            m = int(rng.integers(0, 8))
            pick = rng.integers(0, max(n, 1), m)
            dboxes = (boxes[pick] if n else np.zeros((m, 4))) + rng.integers(-3, 4, (m, 4))
            det.append({"boxes": dboxes, "labels": np.where(rng.random(m) < 0.8, gt[-1]["labels"][pick] if n else 1, rng.integers(1, 4, m)),
                        "scores": rng.choice([0.3, 0.5, 0.9], m) if case % 2 else rng.random(m)})
        result = detect.voc_evaluate(gt, det, 3)
        for c, aps in result["per_class"].items():
            for t, ap in aps.items():
                assert ap == pytest.approx(100 * _detect_voc_eval_reference(gt, det, c, t / 100), abs=1e-9), (case, c, t)


def _detect_args(tmp_path, *flags):
    args = detect.get_args(["--tiny", "--output-dir", str(tmp_path / "run"), *flags])
    args.is_main = True
    return args


def _detect_trunk_state(seed):
    torch.manual_seed(seed)
    trunk = common.ResNetTrunk("resnet18")
    for m in trunk.modules():  # non-default BN statistics, so a skipped buffer would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return trunk.state_dict()  # exactly what dilo.py writes as backbone.pth


def test_detect_backbone_pth_loads_into_c4_and_fpn(tmp_path):
    state = _detect_trunk_state(1)
    torch.save(state, tmp_path / "backbone.pth")
    for model_name in ("faster-c4", "faster-fpn"):
        args = _detect_args(tmp_path, "--model", model_name, "--pretrained", str(tmp_path / "backbone.pth"))
        model = detect.build_model(args, 8)
        report = detect.load_pretrained(model, args)
        assert report["missing"] == [] and report["unexpected"] == []
        loaded = model.state_dict()
        for key, value in state.items():
            if model_name == "faster-c4" and key.startswith("layer4."):
                assert torch.equal(loaded["roi_heads.box_head.res5." + key[len("layer4."):]], value), key
            else:
                assert torch.equal(loaded["backbone.body." + key], value), key
    # the C4 box head IS the pretrained layer4 (stride 2, 14x14 -> 7x7) followed by the extra BN
    model_c4 = detect.build_model(_detect_args(tmp_path, "--model", "faster-c4"), 8)
    res5 = model_c4.roi_heads.box_head
    assert res5.norm.num_features == 512 and "layer4" not in dict(model_c4.backbone.body.named_children())
    assert res5.features(torch.randn(2, 256, 14, 14)).shape == (2, 512, 7, 7)


def test_detect_insloc_fpn_and_box_head_load(tmp_path):
    """InsLoc's backbone.pth: ResNet + fpn.* + box_head.* built as the module docstring says."""
    import torchvision
    state = _detect_trunk_state(2)
    fpn = torchvision.ops.FeaturePyramidNetwork([64, 128, 256, 512], 256, norm_layer=torch.nn.BatchNorm2d)
    head = torchvision.models.detection.faster_rcnn.FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=torch.nn.BatchNorm2d)
    state.update({"fpn." + k: v for k, v in fpn.state_dict().items()})
    state.update({"box_head." + k: v + 1 for k, v in head.state_dict().items()})
    torch.save(state, tmp_path / "backbone.pth")
    checkpoint = {"method": "insloc", "epoch": 1, "args": {}, "model": {
        **{"encoder_q.backbone." + k: v for k, v in state.items() if not k.startswith(("fpn.", "box_head."))},
        **{"encoder_q." + k: v for k, v in state.items() if k.startswith(("fpn.", "box_head."))},
        **{"encoder_k.backbone." + k: v * 0 for k, v in state.items()}, "queue.keys": torch.zeros(4, 128)}}
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    for path in ("backbone.pth", "checkpoint.pth"):
        args = _detect_args(tmp_path, "--model", "faster-fpn", "--box-head", "4conv1fc", "--pretrained", str(tmp_path / path))
        model = detect.build_model(args, 8)
        assert detect.load_pretrained(model, args) == {"missing": [], "unexpected": []}
        loaded = model.state_dict()
        assert torch.equal(loaded["backbone.fpn.layer_blocks.3.0.weight"], state["fpn.layer_blocks.3.0.weight"])
        assert torch.equal(loaded["roi_heads.box_head.5.weight"], state["box_head.5.weight"])
        assert torch.equal(loaded["backbone.body.layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])
    # --load backbone leaves the InsLoc heads at their initialisation; a C4 model reports them unexpected
    args = _detect_args(tmp_path, "--model", "faster-c4", "--pretrained", str(tmp_path / "backbone.pth"))
    report = detect.load_pretrained(detect.build_model(args, 8), args)
    assert report["missing"] == [] and report["unexpected"] and all(k.startswith(("fpn.", "box_head.")) for k in report["unexpected"])


def test_detect_torchvision_and_moco_checkpoints_load(tmp_path):
    import torchvision
    torch.manual_seed(3)
    classifier = torchvision.models.resnet18().state_dict()  # with fc.weight / fc.bias
    torch.save(classifier, tmp_path / "torchvision.pth")
    moco = {"arch": "resnet18", "epoch": 200, "state_dict": {
        **{"module.encoder_q." + k: v for k, v in classifier.items() if not k.startswith("fc.")},
        "module.encoder_q.fc.0.weight": torch.zeros(512, 512), "module.encoder_k.conv1.weight": torch.zeros(64, 3, 7, 7),
        "module.queue": torch.zeros(128, 16)}}
    torch.save(moco, tmp_path / "moco.pth")
    for name in ("torchvision.pth", "moco.pth"):
        args = _detect_args(tmp_path, "--model", "faster-c4", "--pretrained", str(tmp_path / name))
        model = detect.build_model(args, 8)
        assert detect.load_pretrained(model, args) == {"missing": [], "unexpected": []}
        assert torch.equal(model.state_dict()["backbone.body.conv1.weight"], classifier["conv1.weight"])
    # wrong --arch: a clear error, not a silent partial load
    args = _detect_args(tmp_path, "--model", "faster-c4", "--arch", "resnet34", "--pretrained", str(tmp_path / "moco.pth"))
    with pytest.raises(SystemExit, match="missing"):
        detect.load_pretrained(detect.build_model(args, 8), args)


class _DetectEvil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("DETECT_EVIL_MARKER", "/tmp/detect_evil_marker"),))


def test_detect_malicious_pickle_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("DETECT_EVIL_MARKER", str(marker))
    torch.save({"conv1.weight": torch.zeros(1), "payload": _DetectEvil()}, tmp_path / "evil.pth")
    args = _detect_args(tmp_path, "--pretrained", str(tmp_path / "evil.pth"))
    with pytest.raises(SystemExit, match="weights_only"):
        detect.load_pretrained(detect.build_model(args, 8), args)
    assert not marker.exists()


def test_detect_no_weight_decay_on_norm_layers(tmp_path):
    model = detect.build_model(_detect_args(tmp_path, "--model", "mask-c4"), 8)
    decay, no_decay = detect.parameter_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {id(p) for m in norms for p in m.parameters()} == {id(p) for p in no_decay["params"]}
    assert all(p.requires_grad for p in model.parameters())  # every layer trainable, nothing frozen
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_detect_c4_models_follow_the_moco_protocol(tmp_path):
    model = detect.build_model(_detect_args(tmp_path, "--model", "mask-c4", "--roi-batch-size", "8"), 8)
    assert model.rpn._pre_nms_top_n == {"training": 12000, "testing": 6000}
    assert model.rpn._post_nms_top_n == {"training": 2000, "testing": 1000}
    assert model.rpn.anchor_generator.sizes == ((32, 64, 128, 256, 512),)
    assert model.roi_heads.box_roi_pool.output_size == 14 and model.roi_heads.mask_head.box_head is model.roi_heads.box_head
    image = torch.rand(3, 96, 80)
    target = {"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0]]), "labels": torch.tensor([3]),
              "masks": torch.zeros(1, 96, 80, dtype=torch.uint8)}
    target["masks"][0, 20:70, 10:60] = 1
    losses = model([image], [target])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert model.roi_heads.box_head.res5[0].conv1.weight.grad is not None  # res5 trains (not frozen)
    model.eval()
    model.rpn._post_nms_top_n["testing"] = 20  # 1000 RoIs through res5 would be slow on a CPU
    output = model([image])[0]
    assert output["masks"].shape[1:] == (1, 96, 80)


def test_detect_coco_json_end_to_end_matches_pycocotools(tmp_path, capsys):
    """The toy world written as COCO json, through training, resume, inference, detections.json, metrics."""
    root = tmp_path / "toy"
    common.write_toy_world(str(root), 4, "train", image_size=64)
    common.write_toy_world(str(root), 3, "val", image_size=64)
    out = tmp_path / "run"
    flags = ["--tiny", "--dataset", "coco", "--data-root", str(root), "--train-split", "train", "--test-split", "val",
             "--model", "mask-fpn", "--workers", "0", "--max-detections", "5", "--save-freq", "1", "--output-dir", str(out)]
    detect.main(detect.get_args(flags + ["--iters", "1", "--test-images", "1"]))
    detect.main(detect.get_args(flags + ["--iters", "2"]))  # rerun with more iterations = resume
    assert "resumed from" in capsys.readouterr().out
    assert [json.loads(line)["iteration"] for line in open(out / "log.jsonl")] == [0, 1]  # only the missing one ran
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 2
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["protocol"]["model"] == "mask-fpn" and metrics["protocol"]["iters"] == 2 and metrics["test_images"] == 3
    detections = json.load(open(out / "detections.json"))
    assert detections and all(d["image_id"] in (1, 2, 3) and 1 <= d["category_id"] <= 8 for d in detections)
    gt = json.load(open(root / "instances_val.json"))
    for iou_type, dropped in (("bbox", "segmentation"), ("segm", "bbox")):
        stats, _, _ = _detect_pycocotools(gt, [{k: v for k, v in d.items() if k != dropped} for d in detections], iou_type)
        ours = [metrics[iou_type][name] for name in detect.COCO_STATS]
        np.testing.assert_allclose(ours, np.where(stats >= 0, 100 * stats, -1), atol=1e-4)
    assert os.path.exists(out / "model_final.pth")


def test_detect_voc_dataset_reading(tmp_path):
    from PIL import Image
    year = tmp_path / "VOCdevkit" / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (year / folder).mkdir(parents=True)
    (year / "ImageSets/Main/test.txt").write_text("000001\n000002\n")
    for name, (w, h) in (("000001", (50, 40)), ("000002", (30, 60))):
        Image.new("RGB", (w, h)).save(year / "JPEGImages" / f"{name}.jpg")
        (year / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><size><width>{w}</width><height>{h}</height></size>"
            "<object><name>dog</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object>"
            "<object><name>tvmonitor</name><difficult>0</difficult><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
            "</annotation>")
    dataset = detect.VOCDetection(str(tmp_path / "VOCdevkit"), "2007-test", train=False)
    image, target = dataset[0]
    assert image.size == (50, 40) and dataset.aspect_groups() == [1, 0]
    assert target["boxes"].tolist() == [[0.0, 1.0, 20.0, 30.0], [4.0, 4.0, 9.0, 9.0]]  # xmin, ymin - 1 (detectron2)
    assert target["labels"].tolist() == [12, 20] and target["difficult"].tolist() == [True, False]


def test_detect_torchrun_two_processes_on_cpu(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "detect_finetune.py", "--tiny", "--iters", "1",
               "--train-images", "8", "--test-images", "4", "--workers", "0", "--max-detections", "5", "--output-dir", str(out)]
    result = subprocess.run(command, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["protocol"]["world_size"] == 2 and metrics["test_images"] == 4  # both ranks' detections gathered


def test_detect_sampler_groups_and_resumes_and_schedule(tmp_path):
    groups = [i % 3 == 0 for i in range(50)]
    sampler = detect.GroupedInfiniteSampler(groups, 4, rank=0, world_size=2, seed=5)
    batches = [b for b, _ in zip(iter(sampler), range(20))]  # more batches than one epoch holds
    assert all(len({groups[i] for i in b}) == 1 for b in batches)  # one aspect group per batch
    other = detect.GroupedInfiniteSampler(groups, 4, rank=1, world_size=2, seed=5)
    first_epoch = lambda s: {i for b, _ in zip(iter(s), range(5)) for i in b}  # 5 batches < one epoch's 25 images
    assert not first_epoch(sampler) & first_epoch(other)  # the ranks split the permutation
    resumed = detect.GroupedInfiniteSampler(groups, 4, rank=0, world_size=2, seed=5, start=7)
    assert [b for b, _ in zip(iter(resumed), range(13))] == batches[7:]
    args = _detect_args(tmp_path, "--lr", "0.02", "--batch-size", "16", "--warmup", "100", "--lr-steps", "18000", "22000")
    args.lr_actual = 0.02
    lr = lambda i: detect.learning_rate(i, args)
    assert lr(0) == pytest.approx(0.02 * 0.001) and lr(50) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert lr(100) == pytest.approx(0.02) and lr(17999) == pytest.approx(0.02)
    assert lr(18000) == pytest.approx(0.002) and lr(22000) == pytest.approx(0.0002)


# --- fidelity to the papers and releases (issue 19) ---


def _dupr_run(tmp_path, name, processes, extra):
    """dupr.py --tiny for 3 steps in 1 process or under torchrun with 2 (gloo) -> its checkpoint."""
    launcher = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                                    "--master_port=29637"] if processes > 1 else [])
    command = launcher + [os.path.join(HERE, "dupr.py"), "--tiny", "--epochs", "1", "--steps", "3", "--workers", "0",
                          "--image-size", "32", "--batch-size", "16", "--output-dir", str(tmp_path / name)] + extra
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / name / "checkpoint.pth", weights_only=True)


def test_dupr_patch_enqueue_is_per_256_images_of_global_batch(tmp_path):
    """--patch-enqueue 96 at a global batch of 16: 6 patch keys per level and step in total, whether
    one process enqueues 6 or two processes 3 each (the paper: 32 per 256 images, any GPU count)."""
    extra = ["--queue-size", "1000", "--patch-enqueue", "96"]
    one, two = _dupr_run(tmp_path, "one", 1, extra), _dupr_run(tmp_path, "two", 2, extra)
    for m in ("conv4", "conv5"):
        pointers = [int(run["model"][f"patch_queues.{m}.ptr"]) for run in (one, two)]
        assert pointers == [3 * 6, 3 * 6], (m, pointers)
    assert [int(two["model"][f"image_queues.{m}.ptr"]) for m in dupr.LEVELS] == [3 * 16] * 4  # every image key
    assert dupr.patch_keys_per_process(32, 256) == 32 and dupr.patch_keys_per_process(32, 8) == 1  # at least 1


def test_dupr_batch_without_overlap_is_left_out_of_patch_means(tmp_path):
    """An epoch of two steps, the second without any overlapping pair: the patch terms' epoch means
    are the first step's values (not halved by a logged 0), the image terms average both steps."""
    args = dupr.get_args(_DUPR_SMALL + ["--steps", "2", "--output-dir", str(tmp_path)])
    args.device, args.amp, args.lr_actual = torch.device("cpu"), False, 0.0  # lr 0: both steps see the same weights
    torch.manual_seed(0)
    model = dupr.DUPR(args)
    crop_q = torch.tensor([[0, 0, 50, 50]] * 8, dtype=torch.float32)
    flips = torch.zeros(8, dtype=torch.bool)
    images = torch.randn(2, 8, 3, 32, 32)
    loader = [(images[0], images[1], crop_q, crop_q + 10, flips, flips),
              (images[0], images[1], crop_q, crop_q + 100, flips, flips)]  # no overlap anywhere
    records = []
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.0)
    means = dupr.train_one_epoch(model, loader, optimizer, 0, args, records.append)
    assert records[1]["no_overlap"] == 1 and not any("patch_" in name for name in records[1])
    for m in ("conv4", "conv5"):
        for name in (f"patch_{m}", f"acc_patch_{m}"):
            assert means[name] == pytest.approx(records[0][name])
        assert records[0][f"patch_{m}"] > 0.1  # a real loss, so halving it would show
    for name in ("image_conv5", "loss", "no_overlap"):
        assert means[name] == pytest.approx((records[0][name] + records[1][name]) / 2)


def test_insloc_head_init_and_adaptive_roi_sampling_follow_the_release(monkeypatch):
    """The release's init (fcs Xavier-uniform, last Linear N(0, 0.01), biases 0) and RoIAlign with
    adaptive sampling: a 7 x 7 pool of a 56-cell box averages 8 x 8 points a bin."""
    torch.manual_seed(0)
    fpn, c4 = insloc.EncoderFPN("resnet18"), insloc.EncoderC4("resnet18")
    for fc in (fpn.box_head[-2], fpn.projection[0], c4.head[0]):
        bound = math.sqrt(6 / (fc.in_features + fc.out_features))  # Xavier-uniform's
        assert fc.weight.abs().max() <= bound and fc.weight.abs().max() > 0.99 * bound and not fc.bias.any()
    for last in (fpn.projection[2], c4.head[2]):
        assert abs(float(last.weight.std()) - 0.01) < 0.001 and not last.bias.any()
    for conv in (m for m in fpn.fpn.modules() if isinstance(m, nn.Conv2d)):
        bound = math.sqrt(6 / (conv.weight[0].numel() + conv.weight[:, 0].numel()))
        assert conv.weight.abs().max() <= bound
    # A feature map with a period of 4 cells: each 8-cell bin of a 56-cell box spans two periods, so
    # its average is 0; fixed 2 x 2 points a bin sit one period apart and read the same phase (aliasing).
    x = torch.arange(64, dtype=torch.float32) + 0.5
    features = torch.cos(2 * math.pi * x / 4).expand(1, 1, 64, 64).contiguous()
    box = torch.tensor([[4.0, 4.0, 60.0, 60.0]])
    adaptive = common.roi_align_boxes(features, box, 7, 1, sampling_ratio=0)
    fixed = common.roi_align_boxes(features, box, 7, 1, sampling_ratio=2)
    assert adaptive.abs().max() < 1e-5 and fixed.abs().max() > 0.5
    sampling, roi_align = [], torchvision.ops.roi_align  # what the trainers ask for: adaptive everywhere
    monkeypatch.setattr(torchvision.ops, "roi_align", lambda *a, **k: sampling.append(k["sampling_ratio"]) or roi_align(*a, **k))
    boxes = torch.tensor([[8.0, 8.0, 40.0, 56.0]] * 2)
    fpn(torch.randn(2, 3, 64, 64), boxes[:, None].expand(-1, 4, -1)), c4(torch.randn(2, 3, 64, 64), boxes[:, None])
    dupr.roi_grid(torch.randn(2, 8, 4, 4), boxes, torch.tensor([False, True]), 4, 16)
    assert sampling == [0] * 6


if __name__ == "__main__":
    sys.exit(pytest.main(["-q", __file__]))
