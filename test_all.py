"""The repository's test suite: `python -m pytest -q test_all.py` (CPU, a few minutes, no network).

Tests assert properties a reader cares about: geometry against ground truth, equivalence
with plain reference computations, exact resume, identical ranks, refused bad input.
"""
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
    dilo.main(dilo.get_args(["--tiny", "--output-dir", str(out), "--workers", "0"]))
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
    args = SMALL + ["--steps", "2", "--paste-prob", "0.5", "--epochs", "2"]
    dilo.main(dilo.get_args(args + ["--output-dir", str(tmp_path / "once")]))
    train_one_epoch = dilo.train_one_epoch

    def killed_in_epoch_1(model, loader, optimizer, epoch, *rest):
        if epoch == 1:
            raise KeyboardInterrupt
        return train_one_epoch(model, loader, optimizer, epoch, *rest)

    monkeypatch.setattr(dilo, "train_one_epoch", killed_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        dilo.main(dilo.get_args(args + ["--output-dir", str(tmp_path / "twice")]))
    monkeypatch.undo()
    dilo.main(dilo.get_args(args + ["--output-dir", str(tmp_path / "twice")]))
    once = torch.load(tmp_path / "once" / "checkpoint.pth", weights_only=True)
    twice = torch.load(tmp_path / "twice" / "checkpoint.pth", weights_only=True)
    assert once["epoch"] == twice["epoch"] == 2
    state_equal(once["model"], twice["model"])
    for index, buffers in once["optimizer"]["state"].items():  # SGD momentum buffers
        assert torch.allclose(buffers["momentum_buffer"], twice["optimizer"]["state"][index]["momentum_buffer"], atol=1e-6)
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


RANK_CHECK = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {here!r})
import dilo
forward = dilo.DiLo.forward
def checked_forward(self, *batch):
    # state after the previous step: parameters of f_q and f_k, and the queue, on every rank
    flat = torch.cat([p.detach().flatten() for p in self.parameters()] + [self.queue.keys.flatten()])
    copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, flat)
    assert all(torch.equal(copies[0], c) for c in copies), "ranks differ"
    self.checks = getattr(self, "checks", 0) + 1
    return forward(self, *batch)
dilo.DiLo.forward = checked_forward
args = dilo.get_args(sys.argv[1:])
dilo.main(args)
print("rank", args.rank, "checked", "ok")
"""


def test_two_processes_identical_ranks(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(RANK_CHECK.format(here=HERE))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29611",
               str(script), "--tiny", "--epochs", "1", "--steps", "4", "--batch-size", "16", "--image-size", "32", "--workers", "0",
               "--output-dir", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("checked ok") == 2
    assert (tmp_path / "run" / "backbone.pth").exists()


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
    assert found[0].shape == (6, 3) and torch.equal(found[0], found[1])  # the same weights either way


if __name__ == "__main__":
    sys.exit(pytest.main(["-q", __file__]))
