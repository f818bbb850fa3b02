"""The repository's test suite: `python -m pytest -q test_all.py` (CPU, about 2.5 minutes, no network).

Tests assert properties a reader cares about: geometry against ground truth, equivalence
with plain reference computations, exact resume, identical ranks, refused bad input.
`SLOW=1 python -m pytest -q test_all.py` adds the long checks (learning runs, more signals and
resumes, more multi-process runs); `.ci/run` runs them all.
"""
import contextlib
import copy
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import common
import dilo
import tools.diagnose
import tools.iou_curve
import tools.readout
from tools import analysis
import tools.toy_world
from tools.toy_world import write_toy_world

HERE = os.path.dirname(os.path.abspath(__file__))
# A long check whose property a faster default test also guards, or a variant of one that runs by default.
slow = pytest.mark.skipif(os.environ.get("SLOW") != "1", reason="a long check: SLOW=1 runs it (.ci/run does)")


# A run's checkpoint.pth holds both resnet18 encoders, the heads, the queues and the SGD momentum (145 MB at
# --tiny) and the suite starts about a hundred runs: kept, their folders would fill 15 GB per session (and
# pytest keeps three sessions). A passed test's folder goes at once, a green session's base folder at its
# end; a failed test's folder stays to be looked at. The suite's peak is then about 2.5 GB (module fixtures).
@pytest.fixture
def tmp_path(request, tmp_path_factory):
    """pytest's tmp_path, removed when its test passed."""
    failed = request.session.testsfailed
    path = tmp_path_factory.mktemp(re.sub(r"\W", "_", request.node.name)[:30], numbered=True)
    yield path
    if request.session.testsfailed == failed:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _remove_outputs_of_a_green_session(request, tmp_path_factory):
    yield
    if request.session.testsfailed == 0:
        shutil.rmtree(tmp_path_factory.getbasetemp(), ignore_errors=True)


def read_log(path, events=False):
    """log.jsonl's progress and epoch rows (and with events=True also the start/resume/done rows)."""
    with open(path) as f:
        return [row for row in map(json.loads, f) if events or "event" not in row]


def state_equal(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol), key


def outline_share(picture, box, colour, tolerance=0):
    """Share of 160 points on the rectangle box = (x1, y1, x2, y2), in picture pixels, that have a
    pixel of `colour` (RGB, +-tolerance per channel; or a list of colours) within one pixel."""
    pixels = np.asarray(picture.convert("RGB")).astype(int)
    x1, y1, x2, y2 = box
    steps = np.linspace(0, 1, 40)
    points = ([(x1 + (x2 - x1) * u, y) for u in steps for y in (y1, y2)]
              + [(x, y1 + (y2 - y1) * u) for u in steps for x in (x1, x2)])
    hits = 0
    for x, y in points:
        column, row = int(round(x)), int(round(y))
        near = pixels[max(row - 1, 0):row + 2, max(column - 1, 0):column + 2]
        hits += any(bool((np.abs(near - np.array(c)).max(-1) <= tolerance).any()) for c in np.reshape(colour, (-1, 3)))
    return hits / len(points)


def recorded_preview(module, dataset, args):
    """module.write_preview on `dataset`, returning the sheet and what dataset.sample gave each row."""
    samples, sample = [], dataset.sample
    dataset.sample = lambda index: samples.append(sample(index)) or samples[-1]
    module.write_preview(dataset, args)
    return Image.open(os.path.join(args.output_dir, "preview.png")), samples


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
    with pytest.raises(SystemExit, match="interrupted in epoch 2; checkpoint has 1 epochs done"):
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
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {here!r})
runs = json.loads({runs!r})  # [(module, model class, queue count, flags)]; the command line's flags follow
dist.init_process_group("gloo")  # one process group for all runs: torchrun's store does not take many inits
destroy = dist.destroy_process_group
dist.init_process_group = dist.destroy_process_group = lambda *args, **kwargs: None
for module, model, queues, flags in runs:
    trainer = __import__(module)
    def checked_forward(self, *batch, forward=getattr(trainer, model).forward, queues=queues):
        # state after the previous step, on every rank: parameters of f_q and f_k, and every queue
        keys = [b.flatten() for name, b in self.named_buffers() if name.endswith("keys")]
        assert len(keys) == queues, len(keys)
        flat = torch.cat([p.detach().flatten() for p in self.parameters()] + keys)
        copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(copies, flat)
        assert all(torch.equal(copies[0], c) for c in copies), "ranks differ"
        return forward(self, *batch)
    getattr(trainer, model).forward = checked_forward
    args = trainer.get_args(flags + sys.argv[1:])
    trainer.main(args)
    print(module, "rank", args.rank, "checked", "ok", flush=True)
destroy()
"""

# Each trainer under torchrun --nproc_per_node=2, one after another in the same two processes.
RANK_RUNS = [("dilo", "DiLo", 1, ["--steps", "4", "--batch-size", "16", "--image-size", "32"]),
             ("dupr", "DUPR", 6, ["--steps", "3", "--batch-size", "16", "--image-size", "32", "--queue-size", "1000",
                                  "--patch-enqueue", "96"]),
             ("detco", "DetCo", 8, ["--steps", "3", "--batch-size", "8", "--image-size", "32", "--bn-batch", "2"]),
             ("insloc", "InsLoc", 1, ["--steps", "3", "--batch-size", "8", "--image-size", "32", "--bn-batch", "4"])]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """torchrun --nproc_per_node=2 (gloo) of every trainer's --tiny for a few steps: parameters and
    queues identical on both ranks at every forward; returns the output folder (one run per module)."""
    out = tmp_path_factory.mktemp("two_ranks")
    runs = [(module, model, queues, ["--tiny", "--epochs", "1", "--workers", "0", "--print-freq", "1",
                                     "--output-dir", str(out / module)] + flags) for module, model, queues, flags in RANK_RUNS]
    script = out / "check.py"
    script.write_text(RANK_CHECK.format(here=HERE, runs=json.dumps(runs)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29611", str(script)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    for module, *_ in RANK_RUNS:
        assert result.stdout.count(f"{module} rank") == 2, result.stdout
        assert (out / module / "backbone.pth").exists()
    return out


@pytest.mark.parametrize("module", [run[0] for run in RANK_RUNS])
def test_two_processes_identical_ranks(module, two_ranks):
    """Rank 0 logged every step of the global batch and saved the epoch (the ranks were checked equal)."""
    records = read_log(two_ranks / module / "log.jsonl", events=True)
    assert records[0]["world_size"] == 2 and [r["epoch"] for r in records if "checkpoint" in r] == [0]
    flags = next(flags for name, _, _, flags in RANK_RUNS if name == module)  # pairs: --flag value
    steps = int(dict(zip(flags[::2], flags[1::2]))["--steps"])
    assert [r["iteration"] for r in records if "iteration" in r] == list(range(steps))


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
    out, moved = common.shuffled_key_forward(fn, (x, boxes))
    assert torch.allclose(out, linear(x), atol=1e-6)
    assert torch.allclose(moved, x.sum(1, keepdim=True) + boxes, atol=1e-6)  # boxes travel with images


def test_shuffled_key_forward_changes_bn_statistics():
    torch.manual_seed(0)
    x = torch.randn(16, 4) * torch.linspace(0.5, 3, 16)[:, None]
    bn = nn.BatchNorm1d(4).train()
    grouped = common.shuffled_key_forward(common.convert_to_ghost_batchnorm(copy.deepcopy(bn), 16, 4), (x,))
    whole = common.shuffled_key_forward(bn, (x,))
    assert torch.allclose(whole, bn(x), atol=1e-5)  # one group = plain BN, order restored
    assert (grouped - whole).abs().max() > 0.1  # four ghost-BN groups normalise with other statistics


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
    write_toy_world(str(tmp_path), 4, "val", image_size=64, saliency_dir=str(tmp_path / "sal"))
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


def test_bad_input(tmp_path, capsys):
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
    capsys.readouterr()
    image, target = source[corrupt]
    warned = capsys.readouterr().err.splitlines()
    assert len(warned) == 1 and warned[0].startswith("warning: skipping unreadable image ") and "corrupt.jpg" in warned[0]
    assert target["path"] != source.paths[corrupt] and int(source.unreadable.sum()) == 1
    assert source[corrupt][1]["path"] == target["path"] and not capsys.readouterr().err  # remembered: no new warning
    source.unreadable.zero_()
    source.unreadable[:10] = 1  # 10 unreadable files of 125: a small folder may skip them
    common.check_unreadable(source)
    source.unreadable[10] = 1
    with pytest.raises(common.UnreadableImages, match="11 of 125 images"):
        common.check_unreadable(source)
    # 1% of a large folder; up to 10 (and fewer than half) of a small one
    assert [common.unreadable_limit(n) for n in (2, 11, 41, 1000, 100_000)] == [0.02, 5, 10, 10, 1000]


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
    dilo.main(dilo.get_args(["--tiny", "--epochs", "1", "--steps", "3", "--output-dir", str(out), "--workers", "0"]))
    return out


def test_dilo_tiny_run_writes_its_outputs(tiny_run):
    records = read_log(tiny_run / "log.jsonl")
    steps = [r for r in records if "iteration" in r]
    assert [r["epoch"] for r in records if "iteration" not in r] == [0]  # one summary per epoch
    for key in ("loss", "acc", "lr", "img_per_s", "data_time", "step_time", "memory_mb", "pasted", "no_mask"):
        assert all(np.isfinite(r[key]) for r in steps), key
    assert all(0 < r["pasted"] < 1 for r in records if "iteration" not in r)  # p = 0.3 per view


@slow
def test_dilo_training_reduces_infonce_on_fixed_views():
    """The gradient path works: on fixed views of 32 images the InfoNCE loss falls well below
    ln(K + 1) once the queue is full (a 1-minute run on fresh views does not get that far)."""
    torch.manual_seed(0)
    args = dilo.get_args(SMALL + ["--queue-size", "256", "--bn-batch", "8", "--batch-size", "32"])  # BN groups of 8
    model = dilo.DiLo(args)
    world = common.ToyWorld(32, 36)
    images = [torchvision.transforms.v2.functional.pil_to_tensor(world[i][0]) for i in range(32)]
    def view(pixels):  # (3, 36, 36) uint8 -> a MoCo v2 view, (3, 32, 32) uint8
        left, top, right, bottom = dilo.moco_v2_box(pixels)
        return dilo.moco_v2_view(pixels[:, top:bottom, left:right], 32)

    im_q, im_k = (torch.stack([view(p) for p in images]) for _ in range(2))
    flags = torch.zeros(32, 2, dtype=torch.bool), torch.ones(32, dtype=torch.bool), common.draw_colour(64).view(32, 2, 12)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    losses = []
    for _ in range(50):
        loss, _ = model(im_q, im_k, *flags)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    full_queue = np.mean(losses[8:13])  # 256 / 32 = 8 steps fill the queue with real keys
    assert np.mean(losses[-5:]) < full_queue - 0.25 and full_queue > 4.5  # measured: 5.32 -> 4.33 (AVX2 alike)


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


@slow
def test_exact_resume(tmp_path, monkeypatch):
    """2 epochs in one run == killed during epoch 2, then the same command rerun. (By default the
    SIGINT test checks dilo's exact resume as a user meets it.)"""
    once, twice = killed_and_resumed(dilo, SMALL + ["--steps", "2", "--paste-prob", "0.5"], tmp_path, monkeypatch)
    assert torch.equal(once["model"]["queue.keys"], twice["model"]["queue.keys"])


def test_resume_refuses_other_method_and_malicious_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(SystemExit, match=r"refused \(weights_only=True\): it contains Python objects"):
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
    """Each source cell outlines its view's crop window (yellow), at the window's place in the original."""
    torch.manual_seed(0)
    args = dilo.get_args(["--tiny", "--preview", "6", "--paste-prob", "0.5", "--output-dir", str(tmp_path)])
    dataset = dilo.CopyPasteTwoViews(common.open_source("synthetic", 100, args.image_size * 8 // 7), args)
    sheet, samples = recorded_preview(dilo, dataset, args)
    assert sheet.size == (6 * 128, 16 + 6 * 128 + 34) and len(samples) == 6
    for row, (image, _, _, sources, _) in enumerate(samples):
        sx, sy, top = 128 / image.width, 128 / image.height, 16 + row * 128
        for c, (_, (x1, y1, x2, y2), _) in enumerate(sources):
            box = ((2 + c) * 128 + x1 * sx, top + y1 * sy, (2 + c) * 128 + (x2 - 1) * sx, top + (y2 - 1) * sy)
            assert outline_share(sheet, box, (255, 255, 0), tolerance=60) > 0.8, (row, c)


def test_dilo_saliency_dir_and_folder_data(tmp_path):
    write_toy_world(str(tmp_path / "data"), 40, "train", image_size=48, saliency_dir=str(tmp_path / "sal"))
    args = dilo.get_args(SMALL + ["--data", str(tmp_path / "data"), "--saliency", str(tmp_path / "sal"),
                                  "--paste-prob", "1", "--blend", "none", "--background", "dataset"])
    dataset = dilo.CopyPasteTwoViews(common.open_source(args.data, 0, 0), args)
    torch.manual_seed(0)
    covered = 0  # foreground pixels inside the views' crop windows: the image's own pixels there
    for index in range(4):
        image, mask, _, sources, _ = dataset.sample(index)
        assert mask is not None and all(was for _, _, was in sources)
        for window, box, _ in sources:
            on = np.asarray(mask.crop(box)) >= 128
            assert np.array_equal(window.permute(1, 2, 0).numpy()[on], np.asarray(image.crop(box))[on])
            covered += on.sum()
    assert covered > 0
    dilo.main(dilo.get_args(SMALL + ["--data", str(tmp_path / "data"), "--saliency", str(tmp_path / "sal"),
                                     "--steps", "2", "--output-dir", str(tmp_path / "run")]))
    assert (tmp_path / "run" / "backbone.pth").exists()


# ---------------------------------------------------------------------------------------
# dilo.py: RBD saliency, --make-saliency, --saliency rbd; tools.diagnose
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
    """200 toy images of 96..128 px: RBD is far better than a centred Gaussian (docs/rbd.md numbers)."""
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
    data = write_toy_world(str(tmp_path / "data"), 5, image_size=64)
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
    epoch = read_log(os.path.join(_rbd_tiny_run, "log.jsonl"))[-1]
    assert epoch["no_mask"] == 0 and 0 < epoch["pasted"] < 1  # every image got an RBD mask, p = 0.3 pasted
    assert os.path.exists(os.path.join(_rbd_tiny_run, "backbone.pth"))


def test_rbd_diagnosis_png_for_backbone_and_checkpoint(_rbd_tiny_run):
    out = os.path.join(_rbd_tiny_run, "diagnosis")
    found = tools.diagnose.main(["--tiny", os.path.join(_rbd_tiny_run, "backbone.pth"),
                                 os.path.join(_rbd_tiny_run, "checkpoint.pth"), "--output-dir", out])
    for name in ("diagnosis_1.png", "diagnosis_2.png"):  # one sheet per backbone
        assert Image.open(os.path.join(out, name)).size == (5 * 128, 16 + 6 * 128)  # query, gradient, 3 neighbours; 6 rows
    neighbours, neighbours_ckpt = found  # (view retrieval is in tools.readout)
    assert neighbours.shape == (6, 3) and torch.equal(neighbours, neighbours_ckpt)  # the same weights either way


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
    """n pairs of views made by the training geometry (colour runs later, on the device) from coordinate images:
    originals 30..500 px a side (aspect up to 16:1), crop aspect ratios 1:4..4:1, flips, and
    view sizes that differ between the two views and need not be square."""
    torch.manual_seed(seed)
    pairs = []
    for i in range(n):
        h, w = torch.randint(30, 500, (2,)).tolist()
        image = _dupr_coordinate_image(h, w)
        sizes = [int(torch.randint(24, 256, ())) if i % 2 else tuple(torch.randint(24, 256, (2,)).tolist()) for _ in range(2)]
        views = [dupr.MoCoV2ViewWithBox(size, ratio=(1 / 4, 4))(image) for size in sizes]
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
        loss_theirs, _ = theirs(batch[0], batch[1], torch.zeros(8, 2, dtype=torch.bool), torch.ones(8, dtype=torch.bool), batch[-1])
        assert abs(loss_ours.item() - loss_theirs.item()) < 1e-5
        ours.zero_grad(), theirs.zero_grad()
        loss_ours.backward(), loss_theirs.backward()
        for key, value in ours.encoder_q.named_parameters():
            assert torch.allclose(value.grad, theirs.encoder_q.get_parameter(translate(key)).grad, atol=1e-5), key
    assert torch.allclose(ours.image_queues["conv5"].keys, theirs.queue.keys, atol=1e-6)


def test_dupr_backbone_loads_into_torchvision(_resume_run):
    state = torch.load(_resume_run / "backbone.pth", weights_only=True)
    net = torchvision.models.resnet18()
    result = net.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    model = dupr.DUPR(dupr.get_args(_DUPR_SMALL))
    model.load_state_dict(torch.load(_resume_run / "checkpoint.pth", weights_only=True)["model"])
    net.eval(), model.eval()
    x = torch.randn(2, 3, 32, 32)
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
    """R_q red and R_k blue on the original; B_v's S x S grid (yellow) in each view."""
    torch.manual_seed(0)
    args = dupr.get_args(["--tiny", "--preview", "4", "--output-dir", str(tmp_path)])
    dataset = dupr.TwoViewsWithBoxes(common.open_source("synthetic", 100, args.image_size * 8 // 7), args)
    sheet, samples = recorded_preview(dupr, dataset, args)
    assert sheet.size == (3 * 160, 16 + 4 * 160 + 34)
    checked = 0
    for row, (image, views) in enumerate(samples):
        top, scale = 16 + row * 160, torch.tensor([160 / image.width, 160 / image.height] * 2)
        crops = [torch.tensor(crop, dtype=torch.float32) for _, crop, _ in views]
        for crop, colour in zip(crops, ((255, 0, 0), (0, 0, 255))):  # B (yellow) is drawn over parts of them
            box = (crop * scale + torch.tensor([0, top, 0, top])).tolist()
            assert outline_share(sheet, box, [colour, (255, 255, 0)]) > 0.8, (row, colour)
        shifted = (crops[0] * scale + torch.tensor([12, top + 12, 12, top + 12])).tolist()
        assert outline_share(sheet, shifted, (255, 0, 0)) < 0.4  # the check can fail
        flips = [torch.tensor([flipped]) for _, _, flipped in views]
        B_q, B_k, valid = dupr.intersection_in_views(crops[0][None], crops[1][None], *flips, (160, 160), (160, 160))
        S = args.roi_size[-1]  # the grid of the last patch level
        for c, box in enumerate((B_q[0], B_k[0]), start=1):
            if valid:  # the grid's inner lines (B_v's own edges may lie under the next cell)
                x1, y1, x2, y2 = (box + torch.tensor([c * 160, top, c * 160, top])).tolist()
                for i in range(1, S):
                    x, y = x1 + (x2 - x1) * i / S, y1 + (y2 - y1) * i / S
                    vertical = (x, y1 + (y2 - y1) / 4, x, y2 - (y2 - y1) / 4)  # the middle half of each line
                    horizontal = (x1 + (x2 - x1) / 4, y, x2 - (x2 - x1) / 4, y)
                    assert outline_share(sheet, vertical, (255, 255, 0)) > 0.8, (row, c, i)
                    assert outline_share(sheet, horizontal, (255, 255, 0)) > 0.8, (row, c, i)
                checked += 1
    assert checked >= 4


# ---------------------------------------------------------------------------------------
# detco.py
# ---------------------------------------------------------------------------------------

import math  # noqa: E402

import torch.nn.functional as F  # noqa: E402

import detco  # noqa: E402


def test_detco_jigsaw_patches_are_windows_of_their_cells():
    """Patch = the pixels of a 64 x 64 window inside its 85 x 85 cell of the 255 x 255 crop (itself
    the recorded box of the original, resized, maybe flipped); the recorded permutation puts the
    patches back in cell order. Loader outputs are uint8: colour runs later, on the device."""
    assert detco.local_sizes(224) == (255, 85, 64) and detco.local_sizes(64) == (72, 24, 18)
    dataset = detco.GlobalLocalViews(common.ToyWorld(6, 256), detco.get_args(["--tiny", "--image-size", "224"]))
    resized_crop = torchvision.transforms.v2.functional.resized_crop
    torch.manual_seed(0)
    offsets, perms = set(), set()
    for index in range(6):
        image, _, jigsaws = dataset.sample(index)
        for jigsaw in jigsaws:
            x0, y0, x1, y1 = jigsaw["box"]
            pixels = torchvision.transforms.v2.functional.pil_to_tensor(image)
            crop = resized_crop(pixels, y0, x0, y1 - y0, x1 - x0, [255, 255], antialias=True)
            crop = crop.flip(-1) if jigsaw["flipped"] else crop
            assert torch.equal(jigsaw["crop"], crop)
            in_cell_order = jigsaw["patches"][jigsaw["perm"].argsort()]  # (9, 3, 64, 64)
            for cell, ((y, x), patch) in enumerate(zip(jigsaw["windows"].tolist(), in_cell_order)):
                row, column = divmod(cell, 3)
                assert 85 * row <= y <= y + 64 <= 85 * (row + 1) and 85 * column <= x <= x + 64 <= 85 * (column + 1)
                assert torch.equal(patch, crop[:, y:y + 64, x:x + 64])
                offsets.add((y - 85 * row, x - 85 * column))
            perms.add(tuple(jigsaw["perm"].tolist()))
    assert len(offsets) > 50 and len(perms) == 12  # windows and orders are random
    view_q, view_k, patches_q, patches_k, colour = dataset[0]
    assert view_q.shape == view_k.shape == (3, 224, 224) and patches_q.shape == patches_k.shape == (9, 3, 64, 64)
    assert view_q.dtype == patches_q.dtype == torch.uint8 and colour.shape == (4, 12)


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
    signals = [name for name in terms if name.startswith(("std_", "cos_"))]  # 8 embeddings x 2 (run health)
    assert len(terms) - len(signals) == 1 + 24 and len(signals) == 16 and abs(float(loss) - total) < 1e-4
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


@slow
def test_detco_exact_resume(tmp_path, monkeypatch):
    """2 epochs in one run == killed during epoch 2, then the same command rerun."""
    once, twice = killed_and_resumed(detco, SMALL + ["--steps", "2"], tmp_path, monkeypatch)
    for i in range(8):
        assert torch.equal(once["model"][f"queues.{i}.keys"], twice["model"][f"queues.{i}.keys"])


def test_detco_preview(tmp_path):
    """The original shows the global crops (red, blue) and the local crops (yellow, lime) where they were cut."""
    torch.manual_seed(0)
    args = detco.get_args(["--tiny", "--preview", "3", "--output-dir", str(tmp_path)])
    dataset = detco.GlobalLocalViews(common.open_source("synthetic", 100, args.image_size * 8 // 7), args)
    sheet, samples = recorded_preview(detco, dataset, args)
    assert sheet.size == (5 * 128, 16 + 3 * 128)
    for row, (image, views, jigsaws) in enumerate(samples):
        sx, sy, top = 128 / image.width, 128 / image.height, 16 + row * 128
        colours = [(255, 0, 0), (0, 0, 255), (255, 255, 0), (0, 255, 0)]  # in drawing order: later ones cover
        for r, region in enumerate(views + jigsaws):
            x1, y1, x2, y2 = region["box"]
            box = (x1 * sx, top + y1 * sy, x2 * sx, top + y2 * sy)
            assert outline_share(sheet, box, colours[r:]) > 0.7, (row, colours[r])


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
                crop, background = (np.asarray(t.permute(1, 2, 0)) for t in (view["crop"], dataset.load_background(view["background"])))
                if view["flipped"]:
                    crop, background = crop[:, ::-1], background[:, ::-1]
                flips.add(view["flipped"])
                composite = np.asarray(view["composite"].permute(1, 2, 0))  # (S, S, 3) uint8
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
    im_q, im_k, box_q, box_q_aug, box_k, colour = dataset[2]  # the loader's item is that sample, uint8
    assert im_q.shape == im_k.shape == (3, S, S) and torch.equal(im_q, views[0]["composite"]) and colour.shape == (2, 12)
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
    """Shuffled key forward == plain forward when BN uses fixed statistics (eval)."""
    torch.manual_seed(0)
    args = insloc.get_args(["--tiny", "--image-size", "32", "--variant", variant])
    encoder = insloc.InsLoc(args).encoder_k.eval()
    x, boxes = torch.randn(6, 3, 32, 32), insloc.make_anchors(32)[torch.randint(5120, (6, 4))]  # (6, 4, 4)
    boxes = boxes[:, :len(encoder.levels)]
    shuffled = common.shuffled_key_forward(encoder, (x, boxes))
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
    assert Image.open(tmp_path / "preview.png").size == (5 * 128, 16 + 4 * 128 + 34)


@slow
@pytest.mark.parametrize("module, model_class, views_class, extra, term_count", [
    (dupr, dupr.DUPR, dupr.TwoViewsWithBoxes, [], 6), (detco, detco.DetCo, detco.GlobalLocalViews, [], 12),
    (insloc, insloc.InsLoc, insloc.InstanceComposition, ["--variant", "c4"], 0),  # one term: the total
    (insloc, insloc.InsLoc, insloc.InstanceComposition, ["--variant", "fpn"], 4)], ids=["dupr", "detco", "insloc-c4", "insloc-fpn"])
def test_every_loss_term_falls_on_fixed_views(module, model_class, views_class, extra, term_count):
    """Each logged loss term gets a gradient that lowers it: 50 steps on one fixed batch of 8 toy
    images (the method's own views, boxes and patches), K = 32, once the queue holds real keys.
    The smallest fall is DetCo's l2g_res2, 0.16 (the default and the AVX2 kernels alike): 3x the margin.

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
    for _ in range(50):
        loss, terms = model(*batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({name: float(value) for name, value in terms.items()})
    names = [name for name in history[0] if not name.startswith(("acc", "std_", "cos_"))  # not the run-health signals
             and name not in ("no_overlap", "box_iou")]
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
                ann["segmentation"] = (tools.toy_world._uncompressed_rle(mask) if rng.random() < 0.5 or ann["iscrowd"]
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
    write_toy_world(str(root), 4, "train", image_size=64)
    write_toy_world(str(root), 3, "val", image_size=64)
    out = tmp_path / "run"
    flags = ["--tiny", "--dataset", "coco", "--data-root", str(root), "--train-split", "train", "--test-split", "val",
             "--model", "mask-fpn", "--workers", "0", "--max-detections", "5", "--save-freq", "1", "--output-dir", str(out)]
    detect.main(detect.get_args(flags + ["--iters", "1", "--test-images", "1"]))
    detect.main(detect.get_args(flags + ["--iters", "2"]))  # rerun with more iterations = resume
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "schedule: 2 iterations, no lr step, warmup 0" in printed  # what runs
    assert "metrics in percent (-1: no such objects" in printed and "  segm: AP " in printed
    assert [json.loads(line)["iteration"] for line in open(out / "log.jsonl")] == [0, 1]  # only the missing one ran
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 2
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["protocol"]["model"] == "mask-fpn" and metrics["protocol"]["iters"] == 2 and metrics["test_images"] == 3
    assert metrics["unit"] == "percent"
    detections = json.load(open(out / "detections.json"))
    assert detections and all(d["image_id"] in (1, 2, 3) and 1 <= d["category_id"] <= 8 for d in detections)
    gt = json.load(open(root / "instances_val.json"))
    for iou_type, dropped in (("bbox", "segmentation"), ("segm", "bbox")):
        stats, _, _ = _detect_pycocotools(gt, [{k: v for k, v in d.items() if k != dropped} for d in detections], iou_type)
        ours = [metrics[iou_type][name] for name in detect.COCO_STATS]
        np.testing.assert_allclose(ours, np.where(stats >= 0, 100 * stats, -1), atol=1e-4)
    assert not os.path.exists(out / "model_final.pth")  # one file per run: the final checkpoint.pth, without momentum
    assert torch.load(out / "checkpoint.pth", weights_only=True)["optimizer"]["state"] == {}


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


def test_detect_wrong_dataset_folders_give_one_line_naming_the_layout(tmp_path):
    """As a user meets them (one subprocess): a VOC or COCO --data-root of the wrong shape, a split that is
    not there, an annotation file that is not COCO's, images that the lists name but the folder lacks."""
    imagenet = tmp_path / "imagenet" / "train" / "n01440764"
    imagenet.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(imagenet / "a.jpg")
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True)
    (voc / "ImageSets/Main/test.txt").write_text("000001\n000002\n")
    Image.new("RGB", (8, 8)).save(voc / "JPEGImages" / "000001.jpg")  # 000002.jpg is missing
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "instances_text.json").write_text("not json")
    (coco / "annotations" / "instances_list.json").write_text("[1, 2]")
    (coco / "val").mkdir()
    (coco / "annotations" / "instances_val.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "1.jpg", "width": 8, "height": 8}], "annotations": [], "categories": []}))
    cases = [(["--dataset", "voc", "--data-root", str(tmp_path / "imagenet")],
              f"error: --data-root {tmp_path / 'imagenet'} has no VOC2007/ImageSets/Main/trainval.txt; expected "
              "VOCdevkit/VOC2007/{Annotations,JPEGImages,ImageSets/Main} (and VOC2012 for 07+12)"),
             (["--dataset", "voc", "--data-root", str(tmp_path / "VOCdevkit"), "--train-split", "2007-test"],
              f"error: 1 of the 2 names in {voc / 'ImageSets/Main/test.txt'} have no VOC2007/JPEGImages/NAME.jpg "
              "(e.g. 000002.jpg)"),
             (["--dataset", "voc", "--data-root", str(tmp_path / "VOCdevkit"), "--train-split", "trainval"],
              "error: split 'trainval': expected YEAR-SET parts joined by '+', e.g. 2007-trainval+2012-trainval"),
             (["--dataset", "coco", "--data-root", str(tmp_path / "imagenet")],
              f"error: --data-root {tmp_path / 'imagenet'} has no annotations/instances_train2017.json (nor "
              "instances_train2017.json); expected coco/annotations/instances_<split>.json"),
             (["--dataset", "coco", "--data-root", str(coco), "--train-split", "text"],
              f"error: {coco / 'annotations/instances_text.json'} is not a COCO annotation file"),
             (["--dataset", "coco", "--data-root", str(coco), "--train-split", "list"],
              f"error: {coco / 'annotations/instances_list.json'} is not a COCO annotation file"),
             (["--dataset", "coco", "--data-root", str(coco), "--train-split", "val"],
              f"error: 1 of the 1 images that {coco / 'annotations/instances_val.json'} names are not in {coco / 'val'} "
              "(e.g. 1.jpg)")]
    outputs = _detect_cli_errors([flags + ["--output-dir", str(tmp_path / "run")] for flags, _ in cases])
    assert len(outputs) == len(cases)
    for (flags, expected), lines in zip(cases, outputs):
        assert len(lines) == 1 and lines[0].startswith(expected), (flags, lines)


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
    assert all(len({groups[i] for i, _ in b}) == 1 for b in batches)  # one aspect group per batch
    flips = [flip for b in batches for _, flip in b]
    assert 0.3 < np.mean(flips) < 0.7  # p 0.5, drawn with the permutation: a resume replays them
    other = detect.GroupedInfiniteSampler(groups, 4, rank=1, world_size=2, seed=5)
    first_epoch = lambda s: {i for b, _ in zip(iter(s), range(5)) for i, _ in b}  # 5 batches < one epoch's 25 images
    assert not first_epoch(sampler) & first_epoch(other)  # the ranks split the permutation
    resumed = detect.GroupedInfiniteSampler(groups, 4, rank=0, world_size=2, seed=5, start=7)
    assert [b for b, _ in zip(iter(resumed), range(13))] == batches[7:]
    args = _detect_args(tmp_path, "--lr", "0.02", "--batch-size", "16", "--warmup", "100", "--lr-steps", "18000", "22000")
    args.lr_actual = 0.02
    lr = lambda i: detect.learning_rate(i, args)
    assert lr(0) == pytest.approx(0.02 * 0.001) and lr(50) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert lr(100) == pytest.approx(0.02) and lr(17999) == pytest.approx(0.02)
    assert lr(18000) == pytest.approx(0.002) and lr(22000) == pytest.approx(0.0002)



# --- analysis tools (issue 20) ---


def _random_backbones(tmp_path):
    """Two files with the same random resnet18 (a torchvision state_dict and a trainer-style
    checkpoint.pth) and a re-initialised one."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "same.pth")
    torch.save({"model": {f"encoder_q.backbone.{k}": v for k, v in state.items() if not k.startswith("fc.")}},
               tmp_path / "checkpoint.pth")
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "other.pth")
    return [str(tmp_path / name) for name in ("same.pth", "checkpoint.pth", "other.pth")]


def _coordinate_image(width, height):
    """R = x, G = y of each pixel (width, height <= 256)."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


def test_iou_sampler_rois_have_the_iou_they_claim():
    generator = torch.Generator().manual_seed(0)
    for box, width, height in (([10.0, 20.0, 40.0, 35.0], 64, 60), ([0.0, 0.0, 30.0, 64.0], 70, 64), ([3.0, 5.0, 60.0, 50.0], 64, 56)):
        box = torch.tensor(box)
        targets = (torch.arange(20) + torch.rand(20, generator=generator)) / 20
        rois, claimed = tools.iou_curve.sample_rois(box, targets, width, height, generator)
        actual = torchvision.ops.box_iou(box[None], rois)[0]  # independently, from the returned boxes
        assert torch.allclose(claimed, actual, atol=1e-6) and torch.allclose(actual, targets, atol=1e-3)
        assert (rois[:, :2] >= 0).all() and (rois[:, 2] <= width).all() and (rois[:, 3] <= height).all()
        assert (rois[:, 2:] > rois[:, :2]).all()
    full = torch.tensor([0.0, 0.0, 64.0, 64.0])  # no box in the image has IoU 0 with it: the claim stays honest
    rois, claimed = tools.iou_curve.sample_rois(full, torch.tensor([0.0, 0.5]), 64, 64, generator)
    assert torch.allclose(claimed, torchvision.ops.box_iou(full[None], rois)[0]) and claimed[0] > 0


def test_iou_curve_identical_backbones_identical_curves_reinit_differs(tmp_path, capsys):
    paths = _random_backbones(tmp_path)
    result = tools.iou_curve.main(["--tiny", *paths, "--analysis-images", "4", "--output-dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out  # progress lines, at least at the end of each pass
    assert "iou-curve: Sim of RoIs (Fig. 6): 4/4 images, 0:00:" in printed and "eta 0:00:00" in printed
    assert "iou-curve: correspondence (Fig. 7): 4/4 images" in printed
    same, checkpoint, other = result["backbones"]
    assert sum(result["rois_per_bin"]) > 0 and min(result["rois_per_bin"]) > 0  # every IoU bin is sampled
    assert same["similarity_per_bin"] == checkpoint["similarity_per_bin"] and same["slope"] == checkpoint["slope"]
    assert same["correspondence"] == checkpoint["correspondence"]
    assert max(abs(a - b) for a, b in zip(same["similarity_per_bin"], other["similarity_per_bin"])) > 1e-3
    assert json.load(open(tmp_path / "out" / "iou_curve.json")) == json.loads(json.dumps(result))
    for name in ("iou_curve.png", "correspondence.png"):
        Image.open(tmp_path / "out" / name).verify()


def test_correspondence_truth_is_the_view_geometry_on_coordinate_images():
    image, size, n = _coordinate_image(240, 200), 64, 8
    augment = dupr.MoCoV2ViewWithBox(size)  # the training views' geometry
    torch.manual_seed(0)
    flips, checked = set(), 0
    for _ in range(20):
        (view_1, crop_1, flip_1), (view_2, crop_2, flip_2) = augment(image), augment(image)
        flips |= {flip_1, flip_2}
        truth = tools.iou_curve.true_cells(crop_1, flip_1, crop_2, flip_2, size, n)
        pixels_1, pixels_2 = np.asarray(view_1).astype(float), np.asarray(view_2).astype(float)
        s = size // n  # view pixels per cell
        for p, (row, col) in enumerate(truth.tolist()):
            if row < 0:
                continue
            r, c = (p // n) * s + s // 2, (p % n) * s + s // 2  # the 2 x 2 pixels around view 1's cell centre
            original = pixels_1[r - 1:r + 1, c - 1:c + 1, :2].mean((0, 1))  # (x, y) in the original image
            cell = pixels_2[row * s:(row + 1) * s, col * s:(col + 1) * s, :2]  # the true cell of view 2
            assert (cell.min((0, 1)) - 2 <= original).all() and (original <= cell.max((0, 1)) + 2).all(), (p, original)
            checked += 1
    assert flips == {False, True} and checked > 200


def test_readout_grid_labels_are_the_patch_positions():
    image, width, height = _coordinate_image(96, 96), 96, 96
    boxes = tools.readout.grid_boxes(width, height)  # label i = row-major patch i

    class CoordinateTrunk(nn.Module):  # features = the mean (normalised) colour of what it sees
        def forward(self, x):
            return [x]

        def forward_to_res4(self, x):
            return nn.functional.avg_pool2d(x, 16)  # stride 16, as conv4_x

        def layer4(self, x):
            return x

    mean, std = torch.tensor(common.IMAGENET_MEAN), torch.tensor(common.IMAGENET_STD)
    for roi in (False, True):
        features = tools.readout.box_features(CoordinateTrunk(), image, boxes, 32, roi, torch.device("cpu"))  # (9, 3)
        xy = ((features * std + mean) * 255)[:, :2]  # mean original (x, y) inside each patch
        assert torch.equal((xy[:, 0] // 32).long(), torch.arange(9) % 3) and torch.equal((xy[:, 1] // 32).long(), torch.arange(9) // 3)


def test_readout_identical_backbones_identical_numbers(tmp_path, capsys):
    paths = _random_backbones(tmp_path)
    result = tools.readout.main(["--tiny", *paths, "--analysis-images", "8", "--output-dir", str(tmp_path / "out")])
    assert "readout: RoI features: 8/8 images" in capsys.readouterr().out
    for key in ("localization", "classification", "view_retrieval"):
        assert result[key][0] == result[key][1] and all(0 <= v <= 1 for v in result[key])
    assert result["localization_chance"] == pytest.approx(1 / 9) and result["view_retrieval_chance"] == 1 / 8
    Image.open(tmp_path / "out" / "readout.png").verify()


def test_linear_probe_separable_and_chance():
    torch.manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(300, 8) + 4 * nn.functional.one_hot(y, 8).float()  # linearly separable classes
    assert tools.readout.linear_probe(x[:150], y[:150], x[150:], y[150:], 3) > 0.95
    noise = torch.randn(300, 8)  # no signal: near chance
    assert tools.readout.linear_probe(noise[:150], y[:150], noise[150:], y[150:], 3) < 0.5


def test_held_out_coco_folder_equals_the_toy_world(tmp_path):
    write_toy_world(str(tmp_path), 3, split="val", image_size=64 * 8 // 7)
    coco = analysis.HeldOut(3, 64, (str(tmp_path / "instances_val.json"), str(tmp_path / "val")))
    toy = analysis.HeldOut(3, 64)
    assert coco.categories == list(common.TOY_CATEGORIES)
    for (image_c, target_c), (image_t, target_t) in zip(coco, toy):
        assert min(image_t.size) == 64 and np.array_equal(np.asarray(image_c), np.asarray(image_t))
        assert torch.allclose(target_c["boxes"], target_t["boxes"]) and torch.equal(target_c["labels"], target_t["labels"])


def test_analysis_tools_refuse_non_backbones_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    torch.save(torchvision.models.resnet18().state_dict() | {"layer1.0.conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    for name, fragment in (("notes.txt", "not a torch file"), ("missing.pth", "no such file"),
                           ("other.pth", "no torchvision ResNet weights"), ("bad.pth", "not a complete resnet18")):
        with pytest.raises(SystemExit, match=fragment):
            analysis.load_backbone(str(tmp_path / name), "backbone")
    result = subprocess.run([sys.executable, "-m", "tools.iou_curve", "--tiny", str(tmp_path / "notes.txt"), "--output-dir",
                             str(tmp_path)], cwd=HERE, capture_output=True, text=True, timeout=300)  # as a user sees it
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith(f"error: backbone {tmp_path / 'notes.txt'}:")
    with pytest.raises(SystemExit, match=f"^error: backbone {tmp_path / 'other.pth'}: .*no torchvision ResNet weights"):
        tools.readout.main(["--tiny", str(tmp_path / "other.pth"), "--output-dir", str(tmp_path)])
# --- detection transfer exactness (issue 18) ---

def _detect_random_polygons(rng, n):
    """n COCO polygon objects (lists of parts) with image sizes: random, sliver, collinear / repeated
    corners, outside the image, multi-part, tiny, huge, integer / half / arbitrary coordinates."""
    cases = []
    for i in range(n):
        kind, (h, w) = i % 9, rng.integers(1, 70, 2).tolist()
        parts = []
        for _ in range(int(rng.integers(2, 4)) if kind == 4 else 1):
            k = int(rng.integers(3, 10))
            if kind == 0:  # anywhere, partly outside
                p = rng.uniform(-15, max(h, w) + 15, 2 * k)
            elif kind == 1:  # integers, halves, quarters
                p = rng.integers(-4, max(h, w) + 4, 2 * k) / rng.choice([1, 2, 4])
            elif kind == 2:  # thin sliver
                x, y = rng.uniform(0, w), rng.uniform(0, h)
                p = np.array([x, y, x + rng.uniform(-30, 30), y + rng.uniform(-0.3, 0.3), x + rng.uniform(-0.3, 0.3), y + rng.uniform(-30, 30)])
            elif kind == 3:  # collinear points, repeated corners
                x, y, dx, dy = *rng.uniform(0, 40, 2), *rng.uniform(-5, 5, 2)
                t = np.sort(rng.integers(0, 6, k))
                p = np.concatenate([np.stack([x + dx * t, y + dy * t], 1).ravel(), [x, y, x, y]])
            elif kind == 5:  # tiny: everything within a pixel or two
                p = np.tile(rng.uniform(-1, max(h, w) + 1, 2), k) + rng.uniform(-0.7, 0.7, 2 * k)
            elif kind == 6:  # huge, mostly outside a large image
                h, w = rng.integers(300, 700, 2).tolist()
                p = rng.uniform(-600, 1300, 2 * k)
            elif kind == 7:  # a star with many vertices
                a = np.sort(rng.uniform(0, 2 * np.pi, 3 * k))
                r = rng.uniform(1, max(h, w) / 2) * rng.uniform(0.3, 1, 3 * k)
                p = np.stack([w / 2 + r * np.cos(a), h / 2 + r * np.sin(a)], 1).ravel()
            else:  # decimals on the 0.1 grid, where the x5 upsampling rounds on .5
                p = rng.integers(-5, 10 * max(h, w), 2 * k) / 10
            parts.append(p.tolist())
        cases.append((parts, h, w))
    return cases


def test_detect_polygon_rle_is_pycocotools_byte_for_byte():
    from pycocotools import mask as mask_utils
    cases = _detect_random_polygons(np.random.default_rng(18), 720)
    ours = [detect.rle_encode(detect.mask_from_segmentation(parts, h, w))["counts"] for parts, h, w in cases]
    single = [detect.rle_counts_to_string(detect.polygon_rle_counts(parts[0], h, w)) for parts, h, w in cases]
    for n, (parts, h, w) in enumerate(cases):
        rles = mask_utils.frPyObjects(parts, h, w)
        assert ours[n] == mask_utils.merge(rles)["counts"].decode(), (n, parts, h, w)  # COCO.annToRLE
        assert single[n] == rles[0]["counts"].decode(), (n, parts[0], h, w)  # rleFrPoly itself, before the merge
    # an odd trailing value is dropped, as frPoly's len(p) / 2
    for parts in ([[1, 1, 9, 2, 4, 8, 7]], [[1, 1, 9, 2, 4, 8, 7], [0, 0, 3, 0, 3.5, 5.5, 1]]):
        assert detect.rle_encode(detect.mask_from_segmentation(parts, 12, 11))["counts"] == \
            mask_utils.merge(mask_utils.frPyObjects(parts, 12, 11))["counts"].decode()


def _detect_polygon_case(seed):
    """A COCO problem whose ground truth is polygons; detections are RLE masks (bbox: boxes) near them."""
    from pycocotools import mask as mask_utils
    rng = np.random.default_rng(1000 + seed)
    height, width = int(rng.integers(20, 60)), int(rng.integers(20, 60))
    images = [{"id": i + 1, "height": height, "width": width} for i in range(int(rng.integers(1, 4)))]
    categories = [{"id": c + 1, "name": str(c)} for c in range(3)]
    annotations, segm, bbox = [], [], []
    for image in images:
        for parts, _, _ in _detect_random_polygons(rng, int(rng.integers(0, 5))):  # in or partly out of the image
            rle = mask_utils.merge(mask_utils.frPyObjects(parts, height, width))
            box = mask_utils.toBbox(rle).tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": int(rng.integers(1, 3)),
                                "segmentation": parts, "area": float(mask_utils.area(rle)), "bbox": box,
                                "iscrowd": int(rng.random() < 0.15)})
            truth = mask_utils.decode(rle)  # pycocotools' own mask: perfect detections score exactly 100
            for noise in ([0.0] if seed % 5 == 0 else [0.0, 0.1, 0.3])[: int(rng.integers(1, 4))]:
                score = float(rng.choice([0.5, 0.7]) if seed % 3 == 0 else rng.random())
                mask = truth ^ (rng.random(truth.shape) < noise)
                segm.append({"image_id": image["id"], "category_id": annotations[-1]["category_id"], "score": score,
                             "segmentation": detect.rle_encode(mask)})
                bbox.append({"image_id": image["id"], "category_id": annotations[-1]["category_id"], "score": score,
                             "bbox": [v + rng.normal(0, 2 * noise) for v in box]})
    return {"images": images, "annotations": annotations, "categories": categories}, segm, bbox


def test_detect_coco_matches_pycocotools_on_polygon_ground_truth():
    from pycocotools import mask as mask_utils
    for seed in range(40):
        gt, segm, bbox = _detect_polygon_case(seed)
        if not segm:
            continue
        for iou_type, results in (("segm", segm), ("bbox", bbox)):
            stats, precision, _ = _detect_pycocotools(gt, results, iou_type)
            ours = detect.coco_evaluate(gt, results, iou_type)
            np.testing.assert_allclose(ours["stats"], stats, atol=1e-6, err_msg=f"{iou_type} seed {seed}")
            np.testing.assert_allclose(ours["precision"], precision, atol=1e-6, err_msg=f"{iou_type} seed {seed}")
    # pycocotools' own masks of polygon objects as detections score AP 100 (84.6 with the PIL rasteriser before)
    gt = {"images": [{"id": 1, "height": 60, "width": 50}], "categories": [{"id": 1, "name": "a"}], "annotations": []}
    for parts, _, _ in _detect_random_polygons(np.random.default_rng(5), 60):
        rle = mask_utils.merge(mask_utils.frPyObjects(parts, 60, 50))
        if mask_utils.area(rle) > 0:
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": 1, "category_id": 1, "segmentation": parts,
                                      "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": 0})
    perfect = [{"image_id": 1, "category_id": 1, "score": 0.5, "segmentation": mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], 60, 50))}
               for a in gt["annotations"]]
    assert len(perfect) > 20 and detect.coco_evaluate(gt, perfect, "segm")["stats"][:3] == pytest.approx([1.0, 1.0, 1.0])


def test_detect_training_masks_use_the_same_rasteriser(tmp_path):
    from pycocotools import mask as mask_utils
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    polygon = [[3.3, 2.5, 30.7, 4.1, 25.2, 26.9, 4.6, 20.0]]
    (tmp_path / "instances_train.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "a.jpg", "height": 30, "width": 40}], "categories": [{"id": 3, "name": "x"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [3.3, 2.5, 27.4, 24.4], "area": 500.0,
                         "iscrowd": 0, "segmentation": polygon}]}))
    (tmp_path / "train").mkdir()
    os.replace(tmp_path / "a.jpg", tmp_path / "train" / "a.jpg")
    _, target = detect.COCODetection(str(tmp_path), "train", train=True)[0]
    np.testing.assert_array_equal(target["masks"][0].numpy(), mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, 30, 40))))


def test_detect_voc_rounding_decides_hand_worked():
    truths = [{"image_id": 0, "boxes": [[0, 0, 10, 10]], "labels": [1], "difficult": [False]},
              {"image_id": 1, "boxes": [[40, 40, 50, 50]], "labels": [1], "difficult": [False]}]
    # VOC boxes (x + 1, y + 1, x + w, y + h): gt A = [1, 1, 10, 10] (10 x 10 = 100 VOC pixels).
    # A detection [1, 1, 10, 19.96] has IoU 100 / 199.6 = 0.501 > 0.5, a hit; detectron2 writes ymax as "20.0",
    # so voc_eval sees 100 / 200 = 0.5, which is not > 0.5: a miss. Rounded, AP50 of A's image alone = 0.
    sliver = {"image_id": 0, "category_id": 1, "bbox": [0.0, 0.0, 10.0, 19.96], "score": 0.9}
    gt, det = detect.voc_inputs(truths[:1], [sliver])
    assert det[0]["boxes"] == [[1.0, 1.0, 10.0, 20.0]]
    assert detect.voc_evaluate(gt, det, 1)["AP50"] == 0.0
    unrounded = [{"boxes": [[1.0, 1.0, 10.0, 19.96]], "scores": [0.9], "labels": [1]}]
    assert detect.voc_evaluate(gt, unrounded, 1)["AP50"] == pytest.approx(100.0)
    # Scores 0.9004 (a miss, image 1) and 0.9001 (a hit on A, image 0) both print as "0.900": tied, the
    # stable order puts image 0 first. Hits then go TP, FP, TP (B found at 0.5): precision [1, 1/2, 2/3],
    # recall [.5, .5, 1] -> 11-point AP50 = (6 * 1 + 5 * 2/3) / 11 = 28/33. Unrounded, the miss comes
    # first: precision [0, 1/2, 2/3], recall [0, .5, 1] -> the best precision at every recall point is 2/3.
    detections = [{"image_id": 1, "category_id": 1, "bbox": [20.0, 20.0, 5.0, 5.0], "score": 0.9004},
                  {"image_id": 0, "category_id": 1, "bbox": [0.0, 0.0, 10.0, 10.0], "score": 0.9001},
                  {"image_id": 1, "category_id": 1, "bbox": [40.0, 40.0, 10.0, 10.0], "score": 0.5}]
    gt, det = detect.voc_inputs(truths, detections)
    assert det[1]["scores"] == [0.9, 0.5] and det[0]["scores"] == [0.9]
    assert detect.voc_evaluate(gt, det, 1)["AP50"] == pytest.approx(100 * 28 / 33, abs=1e-12)
    raw = [{"boxes": [[1.0, 1.0, 10.0, 10.0]], "scores": [0.9001], "labels": [1]},
           {"boxes": [[21.0, 21.0, 25.0, 25.0], [41.0, 41.0, 50.0, 50.0]], "scores": [0.9004, 0.5], "labels": [1, 1]}]
    assert detect.voc_evaluate(gt, raw, 1)["AP50"] == pytest.approx(100 * 2 / 3, abs=1e-12)


def test_detect_per_dataset_schedule_defaults(tmp_path, capsys):
    get = lambda *flags: detect.get_args(list(flags))
    root = str(tmp_path)
    assert get("--dataset", "voc", "--data-root", root).warmup == 100
    assert get("--dataset", "coco", "--data-root", root).warmup == 1000
    assert get("--dataset", "coco", "--data-root", root, "--schedule", "2x").warmup == 1000  # detectron2 keeps 1000 at 2x
    assert get("--dataset", "voc", "--data-root", root, "--iters", "12000").warmup == 50  # scaled with --iters
    assert get("--dataset", "coco", "--data-root", root, "--warmup", "7").warmup == 7
    assert get("--tiny").warmup == 20 and get("--tiny", "--iters", "50").warmup == 5 and get("--tiny", "--iters", "1").warmup == 0
    assert get("--tiny").precise_bn_iters == 20 and get("--dataset", "voc", "--data-root", root).precise_bn_iters == 200
    assert get("--tiny", "--iters", "3").precise_bn_iters == 3
    # every flag has a help text with exactly one default in it
    with pytest.raises(SystemExit):
        get("-h")
    text = capsys.readouterr().out.split("options:")[1]
    blocks = ["--" + b for b in text.split("\n  --")[1:]]
    assert len(blocks) >= 35
    for b in blocks:
        assert " ".join(b.split()).lower().count("default") == 1, b


def test_detect_flags_are_checked_with_one_line(tmp_path, capsys):
    for flags in (["--lr", "-0.1"], ["--lr", "0"], ["--batch-size", "0"], ["--iters", "0"], ["--warmup", "-1"], ["--wd", "-1"],
                  ["--precise-bn-iters", "-2"], ["--workers", "-1"], ["--image-size", "8"], ["--min-size", "0"],
                  ["--roi-batch-size", "0"], ["--print-freq", "0"], ["--arch", "resnet99"],
                  ["--model", "faster-c4", "--box-head", "4conv1fc"], ["--dataset", "coco", "--data-root", str(tmp_path / "missing")]):
        with pytest.raises(SystemExit):
            detect.get_args(["--tiny", *flags])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
        assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, (flags, err)


def test_detect_fpn_pooler_is_roialign_v2(tmp_path):
    model = detect.build_model(_detect_args(tmp_path, "--model", "mask-fpn"), 8)
    assert model.rpn._post_nms_top_n["training"] == 1000 and model.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    pool = model.roi_heads.box_roi_pool
    torch.manual_seed(0)
    features = {str(k): torch.randn(1, 4, 64 // 2 ** k, 80 // 2 ** k) for k in range(4)}  # strides 4..32 of a 256 x 320 image
    sides = [10.0, 50.0, 111.9, 112.0, 223.0, 224.0, 447.0, 448.0, 600.0]  # detectron2 levels: 2 2 2 3 3 4 4 5 5
    boxes = [torch.tensor([[5.0, 7.0, 5.0 + s, 7.0 + s] for s in sides])]  # exact in float32: levels on their borders
    out = pool(features, boxes, [(256, 320)])
    for i, level in enumerate([2, 2, 2, 3, 3, 4, 4, 5, 5]):
        expected = torchvision.ops.roi_align(features[str(level - 2)], [boxes[0][i:i + 1]], 7, 1 / 2 ** level, sampling_ratio=0, aligned=True)
        torch.testing.assert_close(out[i:i + 1], expected)
    old = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(features, boxes, [(256, 320)])
    assert (old - out).abs().max() > 1e-3  # torchvision's pooler (aligned=False, 2 samples) differs
    assert model.roi_heads.mask_roi_pool.output_size == 14 and isinstance(model.roi_heads.mask_roi_pool, detect.AlignedRoIAlign)
    predictor = model.roi_heads.box_predictor  # detectron2's FastRCNNOutputLayers initialisation
    assert 0.008 < predictor.cls_score.weight.std() < 0.012 and 0.0008 < predictor.bbox_pred.weight.std() < 0.0012
    assert not predictor.cls_score.bias.any() and 0.0008 < model.roi_heads.mask_predictor.mask_fcn_logits.weight.std() < 0.0012


def test_detect_insloc_head_has_extra_norm_and_mask_bn(tmp_path):
    model = detect.build_model(_detect_args(tmp_path, "--model", "mask-fpn", "--box-head", "4conv1fc"), 8)
    head = model.roi_heads.box_head
    assert isinstance(head[7], nn.BatchNorm1d) and isinstance(head[6], nn.ReLU) and isinstance(head[5], nn.Linear)
    x = torch.randn(6, 256, 7, 7)
    head.train()
    fc1 = torch.relu(head[5](head[4](head[3](head[2](head[1](head[0](x)))))))
    torch.testing.assert_close(head(x), nn.functional.batch_norm(fc1, None, None, head[7].weight, head[7].bias, training=True))
    mask_norms = [m for m in model.roi_heads.mask_head.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(mask_norms) == 4
    plain = detect.build_model(_detect_args(tmp_path, "--model", "mask-fpn"), 8)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.roi_heads.mask_head.modules())


def test_detect_precise_bn_changes_only_bn_statistics(tmp_path):
    args = _detect_args(tmp_path, "--train-images", "8", "--precise-bn-iters", "3", "--image-size", "64")
    args.world_size, args.rank, args.device, args.amp = 1, 0, torch.device("cpu"), False
    dataset = detect.SyntheticDetection(8, 64, "train")
    model = detect.build_model(args, dataset.num_classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = torch.utils.data.DataLoader(detect.DetectionTransform(dataset, True), collate_fn=detect.collate,
                                         batch_sampler=[[(2 * b, False), (2 * b + 1, True)] for b in range(4)])
    norm = model.backbone.body.layer1[0].bn1
    seen = []
    hook = norm.register_forward_hook(lambda m, inputs, output: seen.append(inputs[0].mean((0, 2, 3))))
    detect.precise_bn(model, iter(loader), args)
    hook.remove()
    after = model.state_dict()
    for name, _ in model.named_parameters():
        assert torch.equal(after[name], before[name]), name  # no weight changes
    statistics = [k for k in after if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(not torch.equal(after[k], before[k]) for k in statistics)
    assert all(torch.equal(after[k], before[k]) for k in after if k.endswith("num_batches_tracked"))
    torch.testing.assert_close(norm.running_mean, torch.stack(seen).mean(0))  # the plain mean of the 3 batch means
    args.precise_bn_iters = 0
    detect.precise_bn(model, iter(loader), args)
    assert all(torch.equal(model.state_dict()[k], after[k]) for k in after)


def test_detect_coco_training_keeps_small_boxes_as_detectron2(tmp_path):
    (tmp_path / "train").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "train" / "a.jpg")
    boxes = [[5, 5, 0.5, 10], [5, 5, 10, 1.0], [5, 5, 0, 10], [45, 5, 10, 10], [35, 20, 20, 20], [1, 1, 5, 5]]
    (tmp_path / "instances_train.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "height": 30, "width": 40}], "categories": [{"id": 1, "name": "x"}],
        "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": 1.0, "iscrowd": int(i == 5)}
                        for i, b in enumerate(boxes)]}))
    dataset = detect.COCODetection(str(tmp_path), "train", train=True)
    image, target = dataset[0]
    # w 0.5 and h 1.0 are kept; w 0, a box outside the image and the crowd are dropped; boxes are clipped
    assert target["boxes"].tolist() == [[5.0, 5.0, 5.5, 15.0], [5.0, 5.0, 15.0, 6.0], [35.0, 20.0, 40.0, 30.0]]
    model = detect.build_model(_detect_args(tmp_path, "--model", "faster-fpn"), 1)
    image = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    losses = model([image], [target])  # torchvision accepts every kept box (it refuses w or h <= 0)
    assert all(torch.isfinite(v) for v in losses.values())


def _detect_cli_errors(runs):
    """Each flag list run through get_args + main in ONE subprocess (a torch import per case would take
    seconds): the message a SystemExit prints, or everything else the process printed (a traceback)."""
    script = ("import json, sys, detect_finetune as d\n"
              "for flags in json.loads(sys.argv[1]):\n"
              "    try:\n"
              "        d.main(d.get_args(['--tiny', '--workers', '0'] + flags))\n"
              "    except SystemExit as error:\n"
              "        print(error, file=sys.stderr)\n"
              "    print('@@', file=sys.stderr, flush=True)\n")
    result = subprocess.run([sys.executable, "-c", script, json.dumps(runs)], cwd=os.path.dirname(os.path.abspath(__file__)),
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert "Traceback" not in result.stderr and "weights_only=False" not in result.stdout + result.stderr, result.stderr
    return [[line for line in part.splitlines() if line.strip()] for part in result.stderr.split("@@\n")[:-1]]


def test_detect_bad_weight_files_give_one_line(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "folder.pth").mkdir()
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    (tmp_path / "random.pth").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    torch.save({"conv1.weight": torch.zeros(1), "payload": _DetectEvil()}, tmp_path / "evil.pth")
    (tmp_path / "pickle.pth").write_bytes(pickle.dumps({"payload": _DetectEvil()}))
    expected = {"truncated.pth": ": a truncated or damaged torch file", "empty.pth": ": an empty file",
                "folder.pth": ": a directory", "tensor.pth": ": holds a single tensor", "random.pth": ": not a torch file",
                "evil.pth": ": refused (weights_only=True): it contains Python objects (posix.system)",
                "pickle.pth": ": refused (weights_only=True): it contains Python objects", "missing.pth": ": no such file"}
    # a file shaped like resnet34 (3, 4, 6, 3 basic blocks) given to --arch resnet18
    state = _detect_trunk_state(4)
    for layer, blocks in ((1, 3), (2, 4), (3, 6), (4, 3)):
        for block in range(2, blocks):
            state[f"layer{layer}.{block}.conv1.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "r34.pth")
    expected["r34.pth"] = ("has 8 ResNet keys that a resnet18 lacks (e.g. layer1.2.conv1.weight); it looks like a resnet34 "
                           "backbone: pass --arch resnet34")
    marker = tmp_path / "pwned"
    outputs = _detect_cli_errors([["--pretrained", str(tmp_path / name), "--train-images", "4", "--output-dir",
                                   str(tmp_path / ("run34" if name == "r34.pth" else "run"))] for name in expected])
    for (name, message), lines in zip(expected.items(), outputs):
        assert len(lines) == 1 and lines[0].startswith(f"error: --pretrained {tmp_path / name}") and message in lines[0], (name, lines)
    assert len(outputs) == len(expected)
    assert not marker.exists() and not (tmp_path / "run").exists()  # nothing ran, nothing was created (but r34's
    # check needs the model built)


def test_detect_wrong_resnet_depth_is_named(tmp_path, capsys):
    # resnet101 weights into a resnet50 detector: layer3.6..22 are extra (shapes only: meta tensors)
    with torch.device("meta"):
        r101 = {k: v for k, v in torchvision.models.resnet101().state_dict().items() if not k.startswith("fc.")}
    args = _detect_args(tmp_path, "--arch", "resnet50", "--pretrained", "r101.pth")
    with pytest.raises(SystemExit, match=r"ResNet keys that a resnet50 lacks \(e\.g\. layer3\.6\..*it looks like a resnet101 backbone"):
        detect.load_pretrained(detect.build_model(args, 8), args, r101)
    printed = capsys.readouterr().out
    assert len(printed) < 400 and "not loaded: 306 (layer3.6." in printed  # a summary; the full list is in log.jsonl
    record = json.loads(open(tmp_path / "run" / "log.jsonl").readline())
    assert len(record["unexpected"]) == 306 and record["missing"] == []  # (a resnet34 file as a user meets it:
    # test_detect_bad_weight_files_give_one_line)
# --- ghost BatchNorm (issue 23) ---


@pytest.mark.parametrize("bn_class, shape", [(nn.BatchNorm2d, (5, 3, 4, 6)), (nn.BatchNorm1d, (5, 3)),
                                             (nn.BatchNorm1d, (5, 3, 7))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_bn_equals_one_batchnorm_per_group(bn_class, shape, momentum):
    """Ghost BN over G groups == G separate nn.BatchNorm forwards on rows g, g + G, ... (fp64):
    outputs, input and weight gradients, and running statistics (the average of the G)."""
    torch.manual_seed(0)
    G, n = 4, shape[0]
    bn = bn_class(shape[1], momentum=momentum).double()
    with torch.no_grad():
        for tensor in (bn.weight, bn.bias, bn.running_mean):
            tensor.normal_()
        bn.running_var.uniform_(0.5, 2)
    separate = [copy.deepcopy(bn) for _ in range(G)]
    ghost = common.convert_to_ghost_batchnorm(copy.deepcopy(bn), G * n, n)
    assert type(ghost).__name__ == "Ghost" + bn_class.__name__ and ghost.groups == G
    for step in range(3):  # the running statistics' update from a non-initial state, and num_batches_tracked
        x = (3 * torch.randn(G * n, *shape[1:], dtype=torch.float64) + 1).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        weights = torch.randn_like(x)  # a loss that is not symmetric in the outputs
        ghost.zero_grad(), [reference.zero_grad() for reference in separate]
        y = ghost(x)
        (y * weights).sum().backward()
        y_ref = torch.stack([reference(x_ref[g::G]) for g, reference in enumerate(separate)], 1).flatten(0, 1)
        (y_ref * weights).sum().backward()
        assert (y - y_ref).abs().max() < 1e-6
        assert (x.grad - x_ref.grad).abs().max() < 1e-6
        for name in ("weight", "bias"):
            reference_grad = sum(getattr(reference, name).grad for reference in separate)
            assert (getattr(ghost, name).grad - reference_grad).abs().max() < 1e-6
        for name in ("running_mean", "running_var"):
            average = torch.stack([getattr(reference, name) for reference in separate]).mean(0)
            assert (getattr(ghost, name) - average).abs().max() < 1e-6
        assert int(ghost.num_batches_tracked) == int(separate[0].num_batches_tracked) == step + 1
    assert (y - bn.train()(x.detach())).abs().max() > 0.1  # one BN over the whole batch differs
    x = torch.randn(G * n, *shape[1:], dtype=torch.float64)
    plain = bn_class(shape[1], momentum=momentum).double()
    plain.load_state_dict(ghost.state_dict())
    assert torch.equal(ghost.eval()(x), plain.eval()(x))  # eval: the running statistics, as nn.BatchNorm


def test_ghost_bn_is_plain_batchnorm_when_bn_batch_covers_the_local_batch():
    """--bn-batch >= local batch (8 GPUs x 32): bitwise nn.BatchNorm2d, gradients and statistics too."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    ghost = common.convert_to_ghost_batchnorm(copy.deepcopy(bn), 32, 32)
    assert ghost.groups == 1
    x = torch.randn(32, 3, 5, 5, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    ghost(x).square().sum().backward()
    bn(x_ref).square().sum().backward()
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(ghost.weight.grad, bn.weight.grad)
    assert all(torch.equal(a, b) for a, b in zip(ghost.state_dict().values(), bn.state_dict().values()))


@pytest.mark.parametrize("module, model_class, extra", [
    (dilo, "DiLo", []), (dupr, "DUPR", []), (detco, "DetCo", []),
    (insloc, "InsLoc", ["--variant", "c4"]), (insloc, "InsLoc", ["--variant", "fpn"])])
def test_ghost_bn_on_every_bn_of_both_encoders_with_torchvision_keys(module, model_class, extra):
    """Every BN of both encoders (trunk, InsLoc's FPN and box head) is ghost BN with G = local
    batch / --bn-batch; state_dict keys and backbone.pth / fpn. / box_head. exports are torchvision's."""
    args = module.get_args(["--tiny", "--batch-size", "8", "--bn-batch", "4"] + extra)
    model = getattr(module, model_class)(args)
    for encoder in (model.encoder_q, model.encoder_k):
        norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, common.GhostBatchNorm2d) and m.groups == 2 for m in norms)
    if "fpn" in extra:
        assert any(isinstance(m, common.GhostBatchNorm2d) for m in model.encoder_q.fpn.modules())
        assert any(isinstance(m, common.GhostBatchNorm2d) for m in model.encoder_q.box_head.modules())
        plain = insloc.EncoderFPN(args.arch)
        assert list(model.encoder_q.torchvision_state_dict()) == list(plain.torchvision_state_dict())
    resnet = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    assert list(model.encoder_q.backbone.state_dict()) == list(resnet)
    torchvision_resnet = torchvision.models.resnet50()
    keys = list(torchvision_resnet.state_dict())
    converted = common.convert_to_ghost_batchnorm(torchvision_resnet, 256, 32)
    assert isinstance(converted.layer4[2].bn3, common.GhostBatchNorm2d) and list(converted.state_dict()) == keys


def test_bn_batch_must_divide_the_local_batch(capsys):
    """(test_rejected_flag_as_a_user_sees_it_and_no_output_dir runs the same check in a subprocess.)"""
    with pytest.raises(SystemExit):
        dilo.get_args(["--tiny", "--batch-size", "12", "--bn-batch", "8", "--steps", "1", "--workers", "0"])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: --bn-batch 8: must be >= 2 and divide the per-process batch 12 (--batch-size 12 over 1 processes)")


GHOST_METHODS = [("dilo", "DiLo", ["--paste-prob", "0"]), ("detco", "DetCo", []), ("insloc", "InsLoc", ["--variant", "fpn"])]


def _info_nce_fp64(q, k, queue, tau):
    """The trainers' info_nce without its cast to fp32 (it computes in fp32 even for fp64 inputs)."""
    l_pos, l_neg = (q * k).sum(dim=1, keepdim=True), q @ queue.t().to(q.dtype)
    logits = torch.cat([l_pos, l_neg], dim=1) / tau
    target = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target), (l_pos[:, 0] > l_neg.max(dim=1).values).double().mean()


def _ghost_bn_steps(method, model_class, extra, bn_batch=4, steps=2, B=8, size=32, device=torch.device("cpu")):
    """`steps` SGD steps of `method` (fp64) on fixed random batches of B samples and fixed key
    permutations. World size 2: rank r takes rows r, r + 2, ... (as DistributedSampler would) and
    BN sees its B/2 rows; world size 1 with --bn-batch B/2: ghost BN groups rows g, g + 2, ... and
    the key permutation is arranged so that group g holds exactly rank g's keys. Returns, averaged
    over ranks, on the CPU: the loss and the query encoder's gradients per step, and every BN running statistic
    (the model runs on `device`: the GPU tests compare it there with the CPU)."""
    module = __import__(method)
    world, rank = common.world_size(), (torch.distributed.get_rank() if common.world_size() > 1 else 0)
    torch.manual_seed(0)
    args = module.get_args(["--tiny", "--image-size", str(size), "--batch-size", str(B), "--bn-batch", str(bn_batch),
                            "--queue-size", str(2 * B)] + extra)
    model = getattr(module, model_class)(args).double().train().to(device)
    for queue in (m for m in model.modules() if isinstance(m, common.MomentumQueue)):
        queue.float()  # the queues hold fp32 keys (MomentumQueue.enqueue)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    L = B // 2  # samples per rank of the two-process run = per BN group of the one-process run
    to_full = lambda x: (x % L) * 2 + x // L  # row of the two-process gathered batch -> row of the full batch
    average = lambda t: (torch.distributed.all_reduce(t), t / world)[1] if world > 1 else t
    broadcast_permutation, info_nce, records = common._broadcast_permutation, module.info_nce, []
    module.info_nce = _info_nce_fp64  # fp64 through the loss, so that rounding cannot hide a BN difference
    try:
        for _ in range(steps):
            image = lambda *shape: torch.randn(B, *shape, generator=generator, dtype=torch.float64)
            if method == "dilo":
                batch = (image(3, size, size), image(3, size, size), torch.zeros(B, 2, dtype=torch.bool),
                         torch.ones(B, dtype=torch.bool))
            elif method == "detco":
                p = detco.local_sizes(size)[2]
                batch = (image(3, size, size), image(3, size, size), image(9, 3, p, p), image(9, 3, p, p))
            else:
                corner = torch.rand(B, 3, 2, generator=generator, dtype=torch.float64) * size / 2
                boxes = torch.cat([corner, corner + size / 4 + torch.rand(B, 3, 2, generator=generator,
                                                                          dtype=torch.float64) * size / 4], 2)
                batch = (image(3, size, size), image(3, size, size), boxes[:, 0], boxes[:, 1], boxes[:, 2])
            P = torch.randperm(B, generator=generator)  # the two-process run's key permutation
            perm = (P if world == 2 else to_full(P).view(2, L).t().flatten()).to(device)
            common._broadcast_permutation = lambda n, device: perm
            loss, _ = model(*[t[rank::world].to(device) for t in batch])
            optimizer.zero_grad()
            loss.backward()
            parameters = list(model.encoder_q.parameters())
            grads = average(torch.cat([p.grad.flatten() for p in parameters]))  # one all_reduce, as DDP's buckets
            for p, grad in zip(parameters, grads.split([p.numel() for p in parameters])):
                p.grad = grad.view_as(p)
            optimizer.step()
            records.append((average(loss.detach()).cpu(), grads.cpu()))
    finally:
        common._broadcast_permutation, module.info_nce = broadcast_permutation, info_nce
    statistics = {name: average(b.detach().clone()).cpu() for name, b in model.named_buffers() if "running" in name}
    return {"loss": torch.stack([r[0] for r in records]), "grads": torch.stack([r[1] for r in records]),
            "statistics": statistics}


GHOST_RANKS = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {here!r})
dist.init_process_group("gloo")
import test_all
results = {{method: test_all._ghost_bn_steps(method, model_class, extra) for method, model_class, extra in test_all.GHOST_METHODS}}
if dist.get_rank() == 0:
    torch.save(results, {out!r})
"""


def test_ghost_bn_one_process_equals_two_processes(tmp_path):
    """One process, local batch 8, --bn-batch 4 == two gloo processes of 4 (per-GPU BN), for 2 SGD
    steps of DiLo (MoCo v2), DetCo (patches) and InsLoc R50-FPN (FPN and box head BN): same loss,
    gradients, and running statistics (the two ranks' average), given the same samples and keys."""
    script = tmp_path / "ranks.py"
    script.write_text(GHOST_RANKS.format(here=HERE, out=str(tmp_path / "two.pth")))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29631", str(script)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(tmp_path / "two.pth", weights_only=True)
    for method, model_class, extra in GHOST_METHODS:
        one = _ghost_bn_steps(method, model_class, extra)
        # fp64 models and loss (fp32 queues): equal to 1e-6 on any CPU (fp32 losses differed by 2e-5 relative on
        # an AVX-512 CPU after 3 steps); a BN group of the wrong samples differs by > 1% (below)
        assert (one["loss"] - two[method]["loss"]).abs().max() < 1e-6, method
        assert (one["grads"] - two[method]["grads"]).abs().max() < 1e-6 * two[method]["grads"].abs().max(), method
        assert one["statistics"].keys() == two[method]["statistics"].keys()
        for name, value in one["statistics"].items():
            assert (value - two[method]["statistics"][name]).abs().max() < 1e-6, (method, name)
        if method == "dilo":  # without ghost BN (the query's BN sees all 8) the runs differ
            plain = _ghost_bn_steps(method, model_class, extra, bn_batch=8, steps=1)
            assert (plain["loss"] - two[method]["loss"]).abs().max() > 0.05
# --- fidelity to the papers and releases (issue 19) ---


def test_dupr_patch_enqueue_is_per_256_images_of_global_batch(tmp_path, two_ranks):
    """--patch-enqueue 96 at a global batch of 16: 6 patch keys per level and step in total, whether
    one process enqueues 6 or two processes 3 each (the paper: 32 per 256 images, any GPU count)."""
    flags = next(flags for name, _, _, flags in RANK_RUNS if name == "dupr")
    dupr.main(dupr.get_args(["--tiny", "--epochs", "1", "--workers", "0", "--output-dir", str(tmp_path)] + flags))
    one, two = (torch.load(folder / "checkpoint.pth", weights_only=True) for folder in (tmp_path, two_ranks / "dupr"))
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




# --- RBD against Zhu et al.'s reference code (issue 19) ---


def test_rbd_rings_match_brute_force_neighbours(recwarn):
    """superpixel_rings: 1-ring = 4-adjacent pixels (or itself), 2-ring = a 1-ring neighbour's 1-ring."""
    labels = np.asarray(Image.fromarray(np.random.default_rng(0).integers(0, 9, (4, 5), dtype=np.uint8)).resize((15, 12), Image.NEAREST))
    labels = np.unique(labels, return_inverse=True)[1].reshape(labels.shape)
    N, H, W = labels.max() + 1, *labels.shape
    ring1 = np.eye(N, dtype=bool)
    for y in range(H):
        for x in range(W):
            for v, u in ((y + 1, x), (y, x + 1)):
                if v < H and u < W:
                    ring1[labels[y, x], labels[v, u]] = ring1[labels[v, u], labels[y, x]] = True
    ring2 = np.array([[any(ring1[a, c] and ring1[c, b] for c in range(N)) for b in range(N)] for a in range(N)])
    rings = dilo.superpixel_rings(labels)
    assert (rings[0] == ring1).all() and (rings[1] == ring2).all() and (ring2 & ~ring1).any()
    assert (dilo.rbd_saliency(Image.new("RGB", (1, 1))) == 0).all()  # one superpixel, no pair: no NaN, no warning
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_rbd_otsu_and_three_sigma_weights_match_plain_computations():
    rng = np.random.default_rng(0)
    values = np.clip(np.concatenate([rng.normal(0.2, 0.08, 300), rng.normal(0.7, 0.1, 100)]), 0, 1)
    q = np.round(255 * values)
    between = [(q <= k).mean() * (q > k).mean() * (q[q <= k].mean() - q[q > k].mean()) ** 2 if (q <= k).any() and (q > k).any()
               else -1 for k in range(256)]  # Otsu: the split with the largest between-class variance
    assert dilo.otsu_threshold(values) == pytest.approx(np.flatnonzero(between == np.max(between)).mean() / 255)  # ties: their mean
    assert dilo.otsu_threshold(np.full(10, 0.3)) == 0  # one class only: MATLAB's graythresh returns 0
    d = np.array([0.0, 1.0, 2.9, 3.0, 3.1, np.inf])
    assert np.allclose(dilo.gaussian_weights(d, 1.0), [1, np.exp(-0.5), np.exp(-2.9 ** 2 / 2), np.exp(-4.5), 0, 0])
    assert (dilo.gaussian_weights(d, 0.0) == [1, 0, 0, 0, 0, 0]).all()  # a flat image: no NaN


def test_rbd_steps_follow_the_reference_code(monkeypatch):
    """Inside rbd_saliency: meanMin2 clip, adaptive sigmas, sigma_spa 0.4, Otsu zeroing, background
    weight 1000 where BndCon > 3, smoothness over 2-ring neighbours and boundary pairs."""
    seen = {"weights": []}
    spy = lambda name, f: monkeypatch.setattr(dilo, name, lambda *a: seen.setdefault(name, (a, f(*a)))[1])
    for name in ("superpixel_rings", "all_pairs_shortest_paths", "otsu_threshold"):
        spy(name, getattr(dilo, name))
    gaussian, solve = dilo.gaussian_weights, np.linalg.solve
    monkeypatch.setattr(dilo, "gaussian_weights", lambda d, sigma: seen["weights"].append((d, sigma)) or gaussian(d, sigma))
    monkeypatch.setattr(np.linalg, "solve", lambda a, b: seen.setdefault("solve", (a, b)) and solve(a, b))
    rgb = np.random.default_rng(0).integers(100, 150, (120, 160, 3)).astype(np.uint8)
    rgb[40:90, 50:110] = (220, 40, 40)
    dilo.rbd_saliency(Image.fromarray(rgb))
    (_, (ring1, ring2)), ((graph,), d_geo) = seen["superpixel_rings"], seen["all_pairs_shortest_paths"]
    (_, sigma_geo), (_, sigma_spa), (d_smooth, sigma_clr) = seen["weights"]
    links, off = np.isfinite(d_smooth), ~np.eye(len(ring1), dtype=bool)
    assert (links == (ring2 | np.isfinite(graph))).all() and (links & ~ring2).any()  # 2-ring plus boundary pairs
    d_app = np.where(links, d_smooth, np.nan)  # Lab distances, known on every link
    mean_min1, mean_min2 = (np.nanmin(np.where(r & off, d_app, np.nan), 1).mean() for r in (ring1, ring2))
    edges = np.sort(d_app[np.triu(ring1, 1)])[::-1]
    mean_top = edges[:max(1, round(0.01 * len(edges)))].mean()
    clipped = np.isfinite(graph) & off & (graph > 0)
    assert mean_min2 < mean_min1 and np.allclose(d_app[clipped] - graph[clipped], mean_min2)  # edges clipped by meanMin2
    assert sigma_geo == pytest.approx(max(5, min(10, 3 * mean_min1, mean_top / 10)))
    assert sigma_clr == pytest.approx(min(3 * mean_min1, 0.2 * mean_top, 20)) and sigma_spa == 0.4
    (contrast,), threshold = seen["otsu_threshold"]
    system, w_fg = seen["solve"]
    assert 0 < threshold < 1 and (w_fg == np.where(contrast < threshold, 0, contrast)).all()  # Otsu zeroing
    background = (system.sum(1) - w_fg) / 5  # D - W has zero row sums: what is left is the background weight
    certain = np.isclose(background, 1000)
    assert certain.sum() >= 10 and (background[~certain] < 1).all() and np.isclose(background[~certain], 0).sum() >= 1
# ---------------------------------------------------------------------------------------
# --- device-side augmentation and lean loaders (issue 21) ---
# ---------------------------------------------------------------------------------------

import itertools  # noqa: E402

import torchvision.transforms.v2.functional as TF2  # noqa: E402
from PIL import ImageFilter  # noqa: E402

_JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def _torchvision_colour(image, colour):
    """The reference: torchvision v2's tensor functions, one sample at a time, in its drawn order."""
    x = image.float() / 255
    if colour[0]:
        for op in colour[5:9].long().tolist():
            x = getattr(TF2, f"adjust_{_JITTER_OPS[op]}")(x, float(colour[1 + op]))
    if colour[9]:
        x = TF2.rgb_to_grayscale(x, num_output_channels=3)
    if colour[10]:
        x = TF2.gaussian_blur(x, [common.BLUR_TAPS] * 2, [float(colour[11])] * 2)
    return x


def _unnormalise(x):
    return x * torch.tensor(common.IMAGENET_STD)[:, None, None] + torch.tensor(common.IMAGENET_MEAN)[:, None, None]


def test_each_batched_colour_op_equals_torchvision_per_sample():
    """brightness, contrast, saturation, hue, grayscale, blur: each sample of a batch with its own
    parameter equals torchvision.transforms.v2.functional on that sample, within 1/255."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 21, 26), dtype=torch.uint8, generator=generator)
    x = images.float() / 255
    for op, (lo, hi) in zip(_JITTER_OPS, [(0.6, 1.4)] * 3 + [(-0.5, 0.5)]):
        factor = torch.empty(6).uniform_(lo, hi, generator=generator)
        reference = torch.stack([getattr(TF2, f"adjust_{op}")(x[i], float(factor[i])) for i in range(6)])
        assert (common.adjust(x, op, factor) - reference).abs().max() <= 1 / 255, op
    sigma = torch.empty(6).uniform_(0.1, 2.0, generator=generator)
    reference = torch.stack([TF2.gaussian_blur(x[i], [13, 13], [float(sigma[i])] * 2) for i in range(6)])
    assert (common.gaussian_blur(x, sigma) - reference).abs().max() <= 1 / 255
    gray = torch.zeros(6, 12)
    gray[::2, 9] = 1  # grayscale on for samples 0, 2, 4 only
    out = _unnormalise(common.photometric(images, gray))
    reference = torch.stack([TF2.rgb_to_grayscale(x[i], 3) if i % 2 == 0 else x[i] for i in range(6)])
    assert (out - reference).abs().max() <= 1 / 255


def test_photometric_follows_each_samples_order_and_flags():
    """All 24 jitter orders in one batch, random flags: photometric == the torchvision reference per sample."""
    generator = torch.Generator().manual_seed(1)
    colour = common.draw_colour(24, generator)
    colour[:, 5:9] = torch.tensor(list(itertools.permutations(range(4))), dtype=torch.float32)
    colour[:, 0] = 1
    colour[:, 4] = torch.empty(24).uniform_(-0.5, 0.5, generator=generator)  # a large hue: order matters more
    images = torch.randint(0, 256, (24, 3, 20, 20), dtype=torch.uint8, generator=generator)
    out = _unnormalise(common.photometric(images, colour))
    reference = torch.stack([_torchvision_colour(image, c) for image, c in zip(images, colour)])
    assert (out - reference).abs().max() <= 1 / 255
    swapped = colour.clone()
    swapped[:, 5:9] = colour[:, 5:9].flip(1)  # the reversed order gives other images: the order is used
    assert (_unnormalise(common.photometric(images, swapped)) - reference).abs().max() > 10 / 255


def test_blur_spread_matches_pil_on_an_impulse():
    """MoCo v2's blur is PIL's GaussianBlur(radius=sigma); ours, a 13-tap float Gaussian, spreads a 255 impulse
    within 7% as wide (common.BLUR_TAPS NOTE), and a kernel of the wrong sigma would not."""
    from PIL import ImageFilter
    spread = lambda r: float(np.sqrt((r.sum(0) / r.sum() * (np.arange(41) - 20) ** 2).sum()))
    for sigma, pil_spread, our_spread in ((0.5, 0.494, 0.464), (1.0, 0.971, 1.0), (2.0, 2.034, 1.988)):
        impulse = np.zeros((41, 41), np.uint8)
        impulse[20, 20] = 255
        pil = np.asarray(Image.fromarray(impulse).convert("RGB").filter(ImageFilter.GaussianBlur(radius=sigma)))
        x = torch.zeros(1, 3, 41, 41)
        x[..., 20, 20] = 255
        ours = common.gaussian_blur(x, torch.tensor([sigma]))[0, 0].numpy()
        assert spread(pil[..., 0].astype(float)) == pytest.approx(pil_spread, abs=0.01)  # Pillow's rounding
        assert spread(ours) == pytest.approx(our_spread, abs=0.002)
        assert 0.93 < spread(ours) / spread(pil[..., 0].astype(float)) < 1.07


def test_colour_draws_probabilities_and_ranges():
    """Over 10,000 draws: jitter p 0.8, grayscale 0.2, blur 0.5 within 3 sigma; all 24 orders; MoCo v2's ranges."""
    colour = common.draw_colour(10_000, torch.Generator().manual_seed(0))
    for column, p in ((0, 0.8), (9, 0.2), (10, 0.5)):
        assert abs(colour[:, column].mean().item() - p) <= 3 * math.sqrt(p * (1 - p) / 10_000), column
    orders = {tuple(row) for row in colour[:, 5:9].long().tolist()}
    assert len(orders) == 24 and all(sorted(order) == [0, 1, 2, 3] for order in orders)
    assert 0.6 <= colour[:, 1:4].min() and colour[:, 1:4].max() <= 1.4 and colour[:, 4].abs().max() <= 0.1
    assert 0.1 <= colour[:, 11].min() and colour[:, 11].max() <= 2.0


def test_detco_patch_set_shares_its_colour(monkeypatch):
    """The 9 patches of a set get one draw: 9 identical patches stay identical and equal torchvision's
    pipeline on one of them; DetCo's forward gives sets their own rows of `colour`."""
    args = detco.get_args(SMALL + ["--image-size", "64", "--batch-size", "2", "--bn-batch", "2"])
    dataset = detco.GlobalLocalViews(common.ToyWorld(2, 73), args)
    torch.manual_seed(0)
    items = [dataset[i] for i in range(2)]
    patches, colour = items[0][2], common.draw_colour(1, torch.Generator().manual_seed(3))
    colour[0, [0, 10]] = 1  # jitter and blur on
    same = patches[4:5].expand(9, -1, -1, -1)  # (9, 3, p, p): one patch nine times
    out = _unnormalise(common.photometric(same[None], colour)[0])
    assert (out - out[:1]).abs().max() == 0
    assert (out[0] - _torchvision_colour(same[0], colour[0])).abs().max() <= 1 / 255
    seen = []
    monkeypatch.setattr(detco, "photometric", lambda x, c: seen.append((x.shape, c.clone())) or common.photometric(x, c))
    batch = torch.utils.data.default_collate(items)
    detco.DetCo(args)(*batch)
    p = detco.local_sizes(64)[2]
    assert [shape for shape, _ in seen] == [(2, 3, 64, 64)] * 2 + [(2, 9, 3, p, p)] * 2
    assert all(torch.equal(c, batch[-1][:, i]) for i, (_, c) in enumerate(seen))


def test_insloc_foreground_long_side_matches_release():
    """The release fits the crop into (w, h) drawn in [128, 255) whichever its orientation: over 5k
    draws (crops of 500 x 375 images) the mean long side is 200 px +- 2 (4 standard errors; tying
    width to w gave 186)."""
    torch.manual_seed(0)
    image = torch.zeros(3, 375, 500)
    lo, hi = insloc.pixel_sizes(256)["foreground"]
    assert (lo, hi) == (128, 255)
    long_sides = []
    for draw in range(5_000):
        _, _, h, w = torchvision.transforms.RandomResizedCrop.get_params(image, (0.2, 1.0), (1 / 2, 2))
        torch.manual_seed(draw)
        width, height = insloc.fit_foreground(w, h, lo, hi)
        assert abs(width / height - w / h) <= 1.5 * (w / h) / min(width, height)  # aspect kept up to rounding
        assert max(width, height) < hi
        long_sides.append(max(width, height))
        if draw < 200:  # the same draw for the transposed crop gives the transposed size
            torch.manual_seed(draw)
            assert insloc.fit_foreground(h, w, lo, hi) == (height, width)
    assert 198 <= np.mean(long_sides) <= 202


def test_dilo_hard_paste_alpha_blends_raw_saliency():
    """Hard paste: alpha = mask / 255 on a continuous mask; gaussian: that alpha blurred first."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8))
    background = Image.new("RGB", (64, 40), (30, 200, 90))
    mask = Image.fromarray(np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (40, 1)))  # a ramp

    def blend(alpha):
        a = np.asarray(alpha, dtype=np.float64)[..., None] / 255
        return np.asarray(image) * a + np.asarray(background, dtype=np.float64) * (1 - a)

    hard = np.asarray(dilo.copy_paste(image, mask, background, soft=False)).astype(float)
    assert np.abs(hard - blend(mask)).max() <= 1
    soft = np.asarray(dilo.copy_paste(image, mask, background, soft=True)).astype(float)
    blurred = mask.filter(ImageFilter.GaussianBlur(radius=5))
    assert np.abs(soft - blend(blurred)).max() <= 1 and np.abs(soft - hard).max() > 5


def test_window_paste_equals_whole_paste():
    """A pasting view composites (and, for the Gaussian blend, blurs) only its crop window plus a
    margin: the pixels equal the whole-image paste's window, for windows inside and at the borders."""
    rng = np.random.default_rng(0)
    H, W = 120, 160
    image = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    background = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    mask = Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(3))
    boxes = [(0, 0, W, H), (0, 0, 30, 40), (W - 50, H - 20, W, H), (5, 60, W, 61)]
    boxes += [tuple(int(v) for v in dilo.moco_v2_box(image)) for _ in range(40)]
    for soft in (False, True):
        whole = dilo.copy_paste(image, mask, background, soft)
        for box in boxes:
            window = dilo.copy_paste(image, mask, background, soft, box)
            assert window.size == (box[2] - box[0], box[3] - box[1])
            assert np.array_equal(np.asarray(window), np.asarray(whole.crop(box))), (soft, box)
    blurred = mask.filter(ImageFilter.GaussianBlur(radius=5))  # the margin matters: without it the border differs
    narrow = mask.crop((40, 30, 100, 90)).filter(ImageFilter.GaussianBlur(radius=5))
    assert not np.array_equal(np.asarray(narrow), np.asarray(blurred.crop((40, 30, 100, 90))))


def test_jpeg_draft_keeps_recorded_geometry_exact(tmp_path):
    """A JPEG much larger than needed decodes at a DCT scale (2400 x 1800 -> 1200 x 900 for 224 px
    views); DUPR's recorded crop boxes still say exactly where each view pixel comes from."""
    H, W = 1800, 2400
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
    ramp = np.stack([xs / W * 255, ys / H * 255, np.full((H, W), 128.0)], -1)  # colour = position
    (tmp_path / "big").mkdir()
    Image.fromarray(ramp.round().astype(np.uint8)).save(tmp_path / "big" / "a.jpg", quality=95)
    Image.fromarray(ramp[::4, ::4].round().astype(np.uint8)[:375, :500]).save(tmp_path / "big" / "b.jpg")
    source = common.ImageFolderSource(str(tmp_path / "big"), min_side=224)
    assert source[0][0].size == (1200, 900) and source[1][0].size == (500, 375)  # only the large one shrinks
    dataset = dupr.TwoViewsWithBoxes(source, dupr.get_args(["--image-size", "224"]))
    torch.manual_seed(0)
    errors = []
    for _ in range(10):
        image, views = dataset.sample(0)
        for view, (x0, y0, x1, y1), flipped in views:
            u = (torch.arange(224) + 0.5) / 224
            u = 1 - u if flipped else u
            expected_x = (x0 + u * (x1 - x0)) / image.width * 255  # the recorded box, in decoded pixels
            expected_y = (y0 + (torch.arange(224) + 0.5) / 224 * (y1 - y0)) / image.height * 255
            errors.append(max((view[0].float() - expected_x[None, :]).abs().max(),
                              (view[1].float() - expected_y[:, None]).abs().max()))
    assert max(errors) <= 3  # JPEG and rounding; a box off by 1% of the image would be 2.5 levels on average


class _BusyItems(torch.utils.data.Dataset):
    """Each item costs `ms` of CPU time (bench_loader measures process time, not wall time)."""

    def __init__(self, ms):
        self.ms = ms

    def __len__(self):
        return 3

    def __getitem__(self, index):
        start = time.process_time()
        while time.process_time() - start < self.ms / 1000:
            pass
        return index


@pytest.mark.parametrize("module", ["dilo", "dupr", "detco", "insloc"])
def test_bench_loader_prints_ms_per_item(module, tmp_path, capsys):
    threads = torch.get_num_threads()  # --bench-loader measures one thread
    try:
        common.bench_loader(_BusyItems(8.0), 6)
        busy = capsys.readouterr().out.strip()
        trainer = TRAINERS[module]
        trainer.main(trainer.get_args(["--tiny", "--bench-loader", "4", "--output-dir", str(tmp_path)]))
        line = capsys.readouterr().out.strip().splitlines()[-1]
    finally:
        torch.set_num_threads(threads)
    assert busy.startswith("_BusyItems: 6 items, loader ") and 8.0 <= float(busy.split()[-2]) < 10, busy
    assert line.endswith("ms/item") and 0.05 < float(line.split()[-2]) < 5000, line  # a loader item of 64-px views
    assert not (tmp_path / "checkpoint.pth").exists()


# --- resume safety (issues 17, 24) ---

_RESUME = _DUPR_SMALL + ["--steps", "2"]  # dupr --tiny, 2 steps of 8 images at 32 px


def _run_trainer(script, flags, timeout=240, env=None):
    """`python script flags` as a user runs it; returns (returncode, stdout, stderr)."""
    result = subprocess.run([sys.executable, script] + flags, cwd=HERE, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return result.returncode, result.stdout, result.stderr


def _one_line(text):
    """The whole message is one line, with no traceback and no advice to turn weights_only off."""
    assert len(text.strip().splitlines()) == 1, text
    assert "Traceback" not in text and "weights_only=False" not in text, text
    return text.strip()


@pytest.fixture(scope="module")
def _resume_run(tmp_path_factory):
    """A finished smoke run: dupr --tiny --epochs 1 --steps 2."""
    out = tmp_path_factory.mktemp("resume_smoke")
    dupr.main(dupr.get_args(_RESUME + ["--epochs", "1", "--output-dir", str(out)]))
    return out


def test_resume_smoke_then_real_run_stops_with_one_line(_resume_run):
    before = (_resume_run / "checkpoint.pth").read_bytes()
    code, out, err = _run_trainer("dupr.py", _DUPR_SMALL + ["--output-dir", str(_resume_run)])  # the full --tiny run
    line = _one_line(err)
    assert code != 0 and " epoch 1/" not in out
    assert "--steps 2 (checkpoint) vs 0 (command line)" in line
    assert "another --output-dir" in line and "--resume none" in line
    assert (_resume_run / "checkpoint.pth").read_bytes() == before


def test_resume_changed_recipe_flag_names_both_values(_resume_run):
    with pytest.raises(SystemExit) as stopped:  # the same one line a user sees (test_resume_smoke_then_real_run...)
        dupr.main(dupr.get_args(_RESUME + ["--beta", "0", "0", "0.5", "1", "--workers", "1", "--print-freq", "5",
                                           "--patch-chunk", "7", "--output-dir", str(_resume_run)]))
    line = _one_line(str(stopped.value))
    assert "--beta 0.0 0.0 1.0 1.0 (checkpoint) vs 0.0 0.0 0.5 1.0 (command line)" in line
    assert "--patch-chunk" not in line  # the same loss, evaluated in other chunks
    assert "--workers" not in line and "--print-freq" not in line  # not part of the recipe


def test_resume_finished_run_has_nothing_to_do(_resume_run, capsys):
    dupr.main(dupr.get_args(_RESUME + ["--epochs", "1", "--output-dir", str(_resume_run)]))
    out = capsys.readouterr().out
    assert "nothing to do: 1 of 1 epochs done" in out and " epoch 1/" not in out


def test_resume_more_epochs_extend_and_respread_the_cosine(_resume_run, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes((_resume_run / "checkpoint.pth").read_bytes())
    dupr.main(dupr.get_args(_RESUME + ["--epochs", "2", "--output-dir", str(out)]))
    printed = capsys.readouterr().out
    assert "1 of 2 epochs done; --epochs 1 -> 2: the cosine schedule is re-spread over 2 epochs; continuing with epoch 2" in printed
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 2
    first = [r for r in read_log(out / "log.jsonl") if r.get("iteration") == 0]
    assert [r["epoch"] for r in first] == [1]  # the progress lines go on with epoch 1, as the resume line says
    assert first[0]["lr"] == pytest.approx(0.06 * 8 / 256 * 0.5 * (1 + np.cos(np.pi * 1 / 2)))  # halfway along 2 epochs


class _ResumeEvil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("RESUME_EVIL_MARKER", "/tmp/resume_evil_marker"),))


def _bad_checkpoints(folder, good):
    """Every kind of file a user may pass to --resume by mistake -> the words its one line must hold."""
    data = (good / "checkpoint.pth").read_bytes()
    (folder / "truncated.pth").write_bytes(data[:len(data) // 2])
    (folder / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "empty.pth").write_bytes(b"")
    (folder / "directory.pth").mkdir()
    with open(folder / "evil_pickle.pth", "wb") as f:
        pickle.dump({"model": _ResumeEvil()}, f)
    torch.save({"method": "dupr", "args": {}, "model": _ResumeEvil()}, folder / "evil_torch.pth")
    torch.save({"method": "dilo", "epoch": 1, "args": {"arch": "resnet18"}}, folder / "dilo.pth")
    torch.save(torch.zeros(3), folder / "tensor.pth")
    return {good / "backbone.pth": "not a dupr checkpoint (it holds a state_dict", folder / "truncated.pth": "truncated",
            folder / "random.pth": "not a torch file", folder / "empty.pth": "empty", folder / "directory.pth": "directory",
            folder / "evil_pickle.pth": "refused (weights_only=True): it contains Python objects", folder / "evil_torch.pth": "refused",
            folder / "dilo.pth": "not a dupr checkpoint (it holds a dilo checkpoint)",
            folder / "tensor.pth": "not a dupr checkpoint (it holds a bare tensor)", folder / "missing.pth": "no such file"}


def test_resume_bad_files_give_one_line(_resume_run, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("RESUME_EVIL_MARKER", str(marker))
    for path, words in _bad_checkpoints(tmp_path, _resume_run).items():
        with pytest.raises(SystemExit) as stopped:
            dupr.main(dupr.get_args(_RESUME + ["--resume", str(path), "--output-dir", str(tmp_path / "run")]))
        assert words in _one_line(str(stopped.value)) and str(path) in str(stopped.value), path
        printed = capsys.readouterr().err
        assert "Traceback" not in printed and "weights_only=False" not in printed, printed
    assert not marker.exists()
    code, out, err = _run_trainer("dupr.py", _RESUME + ["--resume", str(_resume_run / "backbone.pth")])  # as a user sees it
    assert code != 0 and "not a dupr checkpoint" in _one_line(err)


@pytest.mark.parametrize("module", ["dilo", "detco", "insloc"])
def test_resume_every_trainer_refuses_backbone_pth(module, _resume_run, tmp_path):
    trainer = {"dilo": dilo, "detco": detco, "insloc": insloc}[module]
    with pytest.raises(SystemExit, match=f"not {'an' if module == 'insloc' else 'a'} {module} checkpoint .it holds a state_dict"):
        trainer.main(trainer.get_args(SMALL + ["--resume", str(_resume_run / "backbone.pth"), "--output-dir", str(tmp_path)]))


def test_resume_detect_refuses_bad_files(_resume_run, tmp_path):
    for path, words in [(_resume_run / "backbone.pth", "not a detect checkpoint"), (_resume_run / "checkpoint.pth",
                        "not a detect checkpoint (it holds a dupr checkpoint)"), (tmp_path, "directory")]:
        args = _detect_args(tmp_path, "--resume", str(path))
        model = detect.build_model(args, 8)
        with pytest.raises(SystemExit) as stopped:
            detect.load_checkpoint(model, torch.optim.SGD(model.parameters(), lr=0.1), args)  # -> (iteration, rng)
        assert words in _one_line(str(stopped.value))


_INTERRUPTED = SMALL + ["--epochs", "2", "--steps", "4", "--workers", "2"]  # dilo, with loader workers


@pytest.fixture(scope="module")
def _uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    code, _, err = _run_trainer("dilo.py", _INTERRUPTED + ["--output-dir", str(out)])  # threads as in the runs below
    assert code == 0, err[-3000:]
    return torch.load(out / "checkpoint.pth", weights_only=True)


@pytest.mark.parametrize("signal_name", ["SIGINT", pytest.param("SIGTERM", marks=slow)])
def test_resume_interrupt_mid_epoch_one_line_then_exact_resume(signal_name, _uninterrupted, tmp_path):
    """Ctrl-C (SIGINT to the process group: the loader workers get it too) or SIGTERM (a scheduler,
    torchrun) in epoch 1: one line, then the same command resumes exactly."""
    import signal
    import time
    command = [sys.executable, "dilo.py"] + _INTERRUPTED + ["--output-dir", str(tmp_path)]
    process = subprocess.Popen(command, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, seen = "", []
        for line in process.stdout:  # wait for the first progress line of epoch 1
            out += line
            seen += [time.monotonic()] if " epoch 1/2 [" in line else []
            if " epoch 2/2 [" in line:
                # NOTE: half a step later, in the forward/backward pass, not while the main process receives
                # the next batch: a cut file-descriptor handshake makes a worker's resource_sharer thread
                # print a traceback (see docs/running.md)
                time.sleep((seen[-1] - seen[0]) / (len(seen) - 1) / 2)
                os.killpg(process.pid, getattr(signal, signal_name))
                break
        rest, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode != 0 and "epoch 2/2 [4/4]" not in out + rest
    assert _one_line(err) == "interrupted in epoch 2; checkpoint has 1 epochs done; rerun the same command to resume"
    code, out, err = _run_trainer("dilo.py", _INTERRUPTED + ["--output-dir", str(tmp_path)])  # the same command again
    assert code == 0 and "1 of 2 epochs done; continuing with epoch 2" in out, err[-3000:]
    twice = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert twice["epoch"] == 2
    state_equal(_uninterrupted["model"], twice["model"])
    for index, buffers in _uninterrupted["optimizer"]["state"].items():
        assert torch.allclose(buffers["momentum_buffer"], twice["optimizer"]["state"][index]["momentum_buffer"], atol=1e-6)


_DETECT_SHORT = ["detect_finetune.py", "--tiny", "--iters", "4", "--train-images", "16", "--test-images", "2",
                 "--image-size", "64", "--min-size", "64", "--max-size", "96", "--test-size", "64", "--roi-batch-size", "16",
                 "--precise-bn-iters", "1", "--print-freq", "1", "--workers", "1"]


def _detect_interrupted(folder, signals):
    """_DETECT_SHORT into `folder`, with `signals` SIGINTs to its process group (Ctrl-C) after its first
    progress line -> (returncode, stdout, stderr)."""
    import signal
    command = [sys.executable] + _DETECT_SHORT + ["--output-dir", str(folder)]
    process = subprocess.Popen(command, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out = ""
        for line in process.stdout:
            out += line
            if line.startswith("iter "):
                for _ in range(signals):  # a second one after the first was handled (signals do not queue)
                    os.killpg(process.pid, signal.SIGINT)
                    time.sleep(0.2)
                break
        rest, err = process.communicate(timeout=120)
    finally:
        process.kill()
    return process.returncode, out + rest, err


@slow
def test_detect_interrupt_saves_the_iteration_and_resumes_exactly(tmp_path):
    """detect_finetune.py and Ctrl-C as a user meets them: the iteration in progress finishes and is saved,
    one line says so; the rerun starts with the next iteration and ends with the weights of a run that was
    never interrupted (the sampler replays data and flips; the checkpoint holds the random state)."""
    code, _, err = _run_trainer(_DETECT_SHORT[0], _DETECT_SHORT[1:] + ["--output-dir", str(tmp_path / "once")])
    assert code == 0, err[-3000:]
    code, out, err = _detect_interrupted(tmp_path / "twice", 1)
    line = _one_line(err)
    done = int(line.split()[3].rstrip(";"))
    assert code == 1 and line == (f"interrupted at iteration {done}; checkpoint has {done} iterations; "
                                  "rerun the same command to resume") and 1 <= done < 4, (line, out)
    assert torch.load(tmp_path / "twice" / "checkpoint.pth", weights_only=True)["iteration"] == done
    code, out, err = _run_trainer(_DETECT_SHORT[0], _DETECT_SHORT[1:] + ["--output-dir", str(tmp_path / "twice")])
    assert code == 0 and f"{done} of 4 iterations done" in out, err[-3000:]
    assert [line.split()[1] for line in out.splitlines() if line.startswith("iter ")][0] == f"{done + 1}/4"
    once, twice = (torch.load(tmp_path / name / "checkpoint.pth", weights_only=True) for name in ("once", "twice"))
    assert once["iteration"] == twice["iteration"] == 4
    state_equal(once["model"], twice["model"])


@slow
def test_detect_second_signal_exits_at_once(tmp_path):
    code, out, err = _detect_interrupted(tmp_path, 2)
    assert code == 1 and _one_line(err) == ("interrupted (SIGINT); exiting now; the last checkpoint in the output "
                                            "directory is kept; rerun the same command to resume")
    assert not (tmp_path / "checkpoint.pth").exists() and "metrics" not in out  # nothing saved, nothing evaluated


def _two_nodes(commands, port, timeout=240):
    """Two processes as two torchrun nodes of one process each (LOCAL_RANK 0 on both), gloo on one
    machine; [(returncode, stdout, stderr)] per rank. A hang fails on the timeout."""
    processes = [subprocess.Popen([sys.executable] + command, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                                                  "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
                                                  "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
                 for rank, command in enumerate(commands)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in processes]
        return [(p.returncode, out, err) for p, (out, err) in zip(processes, outputs)]
    finally:
        for p in processes:
            p.kill()


@slow
def test_resume_two_nodes_agree_or_both_stop(tmp_path):
    import socket
    shared, empty = tmp_path / "shared", tmp_path / "empty"
    flags = SMALL + ["--steps", "2"]
    dilo.main(dilo.get_args(flags + ["--output-dir", str(shared)]))  # the first run (its world size may differ)
    # rank 1's node has no checkpoint (a local disk): both ranks stop before training with one line
    results = _two_nodes([["dilo.py"] + flags + ["--epochs", "2", "--output-dir", str(folder)] for folder in (shared, empty)], 29652)
    for code, out, err in results:
        line = _one_line(err)
        assert code != 0 and " epoch 2/2 [" not in out
        assert "the ranks do not resume from the same checkpoint" in line
        assert f"rank 1 ({socket.gethostname()}): no {empty / 'checkpoint.pth'}" in line and "share" in line
    assert torch.load(shared / "checkpoint.pth", weights_only=True)["epoch"] == 1
    # both see the same file: both resume, identical at every forward (RANK_CHECK), and finish epoch 1
    script = tmp_path / "check.py"
    script.write_text(RANK_CHECK.format(here=HERE, runs=json.dumps([("dilo", "DiLo", 1, [])])))
    for code, out, err in _two_nodes([[str(script)] + flags + ["--epochs", "2", "--output-dir", str(shared)]] * 2, 29653):
        assert code == 0 and "checked ok" in out, err[-3000:]
    assert torch.load(shared / "checkpoint.pth", weights_only=True)["epoch"] == 2


@slow
def test_resume_detect_two_nodes_both_stop(tmp_path):
    shared, empty = tmp_path / "shared", tmp_path / "empty"
    args = _detect_args(tmp_path, "--iters", "3", "--output-dir", str(shared))
    model = detect.build_model(args, 8)
    shared.mkdir()
    torch.save({"method": "detect", "iteration": 1, "args": vars(args), "model": model.state_dict(),
                "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict()}, shared / "checkpoint.pth")
    flags = ["--tiny", "--iters", "3", "--train-images", "8", "--test-images", "4", "--workers", "0"]
    results = _two_nodes([["detect_finetune.py"] + flags + ["--output-dir", str(folder)] for folder in (shared, empty)], 29654)
    for code, out, err in results:
        assert code != 0 and "the ranks do not resume from the same checkpoint" in _one_line(err)
        assert f"no {empty / 'checkpoint.pth'}" in err
# --- long-run safety: data, flags, logs (issue 17) ---

import detco  # noqa: E402
import insloc  # noqa: E402

TRAINERS = {"dilo": dilo, "dupr": dupr, "detco": detco, "insloc": insloc}
_QUIET = ["--image-size", "32", "--batch-size", "32", "--queue-size", "32", "--bn-batch", "8", "--paste-prob", "0"]


def _folder_with_unreadable(tmp_path, good, bad):
    folder = tmp_path / "data" / "train"
    folder.mkdir(parents=True)
    world = common.ToyWorld(good, 40)
    for i in range(good):
        world[i][0].save(folder / f"{i:03d}.png")
    for i in range(bad):
        (folder / f"bad{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return str(tmp_path / "data")


def _run_dilo_tiny(args, tmp_path, nproc=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if nproc == 2 else []  # a free port
    command = [sys.executable] + launcher + [os.path.join(HERE, "dilo.py"), "--tiny", "--output-dir", str(tmp_path / "run")]
    return subprocess.run(command + args, capture_output=True, text=True, timeout=600, cwd=HERE,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_small_folder_with_an_empty_file_trains_and_warns_once_over_2_epochs(tmp_path):
    """11 images, one of them 0 bytes: trained on the other 10. Workers are forked anew every epoch: the bad
    file is remembered, warned about once (in one line), never retried. The start line names the BN group."""
    data = _folder_with_unreadable(tmp_path, 10, 1)
    (tmp_path / "data" / "train" / "bad0.jpg").write_bytes(b"")
    result = _run_dilo_tiny(_QUIET + ["--data", data, "--epochs", "2", "--workers", "2", "--batch-size", "8",
                                      "--bn-batch", "32"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    warned = [line for line in result.stderr.splitlines() if "bad0.jpg" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: skipping unreadable image "), result.stderr
    # and the start says which BatchNorm group it trains with (--bn-batch 32 over a per-process batch of 8)
    assert "BatchNorm: over the 8 images per process (--bn-batch 32 is more: one group of 8)" in result.stdout
    assert [r["epoch"] for r in read_log(tmp_path / "run" / "log.jsonl") if "checkpoint" in r] == [0, 1]


@slow
def test_unreadable_images_over_the_limit_abort_with_one_line(tmp_path):
    data = _folder_with_unreadable(tmp_path, 20, 11)
    result = _run_dilo_tiny(_QUIET + ["--data", data, "--batch-size", "8", "--epochs", "2", "--workers", "2"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # besides the warnings
    assert len(errors) == 1 and "11 of 31 images under" in errors[0], result.stderr
    assert errors[0].endswith("are unreadable (over 1%, and over the 10 a small folder may skip)")


@slow
def test_unreadable_images_are_shared_between_ranks_and_no_ddp_warning(tmp_path):
    """Two ranks, 1 bad file in 101, 3 epochs: warned once in all (the flags are ORed over ranks at
    epoch ends), and DDP's construction prints no FutureWarning about broadcast_buffers."""
    data = _folder_with_unreadable(tmp_path, 100, 1)
    result = _run_dilo_tiny(_QUIET + ["--data", data, "--epochs", "3", "--workers", "1"], tmp_path, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("warning: skipping unreadable image") == 1
    assert "broadcast_buffers" not in result.stderr and "FutureWarning" not in result.stderr


REJECTED = [("--lr", "-0.1"), ("--lr", "0"), ("--ema", "1.5"), ("--ema", "1"), ("--temperature", "0"),
            ("--queue-size", "0"), ("--queue-size", "16"), ("--batch-size", "0"), ("--bn-batch", "7"),
            ("--bn-batch", "1"), ("--image-size", "16"), ("--epochs", "0"), ("--steps", "-1"), ("--wd", "-1")]
METHOD_REJECTED = {"dilo": [("--paste-prob", "1.5")], "dupr": [("--alpha", "0", "0", "0", "0", "--beta", "0", "0", "0", "0"),
                                                               ("--roi-size", "0", "7", "7", "7")],
                   "detco": [("--level-weights", "-1", "1", "1", "1")],
                   "insloc": [("--fg-ratio", "2", "1"), ("--head-lr-scale", "-1")]}


@pytest.mark.parametrize("name", TRAINERS)
def test_out_of_range_flags_give_one_argparse_line(name, tmp_path, capsys, monkeypatch):
    module = TRAINERS[name]
    for flags in REJECTED + METHOD_REJECTED[name]:
        with pytest.raises(SystemExit) as exit_info:
            module.get_args(["--tiny"] + list(flags))
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_info.value.code == 2 and ": error: " in error and flags[0] in error, (flags, error)
    monkeypatch.setenv("WORLD_SIZE", "3")  # torchrun's, read at parse time
    with pytest.raises(SystemExit):
        module.get_args(["--tiny"])  # batch 32 over 3 processes
    assert "divide by the world size 3" in capsys.readouterr().err


def test_rejected_flag_as_a_user_sees_it_and_no_output_dir(tmp_path):
    result = _run_dilo_tiny(["--bn-batch", "7", "--epochs", "1", "--steps", "1"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("dilo.py: error: --bn-batch 7: must be >= 2 and divide the "
                                                      "per-process batch 32 (--batch-size 32 over 1 processes)")
    with pytest.raises(SystemExit, match="no such directory"):
        dilo.main(dilo.get_args(SMALL + ["--data", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "run")]))
    assert not (tmp_path / "run").exists()  # a run that fails early leaves no directory behind
    with pytest.raises(SystemExit, match="no checkpoint was written yet"):
        dilo.main(dilo.get_args(SMALL + ["--lr", "1e30", "--steps", "3", "--output-dir", str(tmp_path / "nan")]))


def test_every_flag_has_help_and_one_default(capsys):
    for name, module in TRAINERS.items():
        with pytest.raises(SystemExit):
            module.get_args(["-h"])
        options = capsys.readouterr().out.split("options:")[1]
        entries = [e for e in options.split("\n  -") if e.strip() and not e.startswith("h, --help")]
        for entry in entries:
            assert len(entry.split(None, 2)) > 1 and entry.count("(default:") == 1, (name, entry)


def test_dilo_saliency_errors_name_the_way_out(tmp_path):
    (tmp_path / "masks").mkdir()
    with pytest.raises(SystemExit, match="--data synthetic has no files: use --saliency gt"):
        dilo.main(dilo.get_args(SMALL + ["--saliency", str(tmp_path / "masks"), "--output-dir", str(tmp_path / "a")]))
    write_toy_world(str(tmp_path / "data"), 4, "train", image_size=48)
    with pytest.raises(SystemExit) as exit_info:
        dilo.main(dilo.get_args(SMALL + ["--data", str(tmp_path / "data"), "--output-dir", str(tmp_path / "b")]))
    assert "--make-saliency" in str(exit_info.value) and "--saliency rbd" in str(exit_info.value)


def test_logs_carry_time_and_whole_run_eta_and_a_resume_drops_redone_rows(tmp_path, monkeypatch, capsys):
    args = SMALL + ["--steps", "2", "--epochs", "2", "--output-dir", str(tmp_path)]
    train_one_epoch = dilo.train_one_epoch

    def killed_after_epoch_1_logged(model, loader, optimizer, epoch, *rest):
        stats = train_one_epoch(model, loader, optimizer, epoch, *rest)
        if epoch == 1:  # its progress rows are written, its checkpoint is not
            raise KeyboardInterrupt
        return stats

    monkeypatch.setattr(dilo, "train_one_epoch", killed_after_epoch_1_logged)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        dilo.main(dilo.get_args(args))
    monkeypatch.undo()
    first = read_log(tmp_path / "log.jsonl", events=True)
    assert [(r["epoch"], r["iteration"]) for r in first if "iteration" in r] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    start = first[0]
    assert start["event"] == "start" and start["world_size"] == 1 and start["torch"] == torch.__version__
    assert start["args"]["lr"] == 0.03 and start["args"]["output_dir"] == str(tmp_path)
    step = first[1]  # 1 of 4 steps of the run done: the ETA is for the other 3
    assert step["eta_s"] == pytest.approx(3 * step["elapsed_s"]) and step["time"].startswith(time.strftime("%Y-"))
    capsys.readouterr()
    dilo.main(dilo.get_args(args))
    rows = read_log(tmp_path / "log.jsonl", events=True)
    assert all("time" in r and "elapsed_s" in r for r in rows)
    assert [r.get("event") for r in rows if "event" in r] == ["start", "resume", "done"]
    keys = [(r["epoch"], r["iteration"]) for r in rows if "iteration" in r]
    assert keys == [(0, 0), (0, 1), (1, 0), (1, 1)]  # epoch 2's rows of the killed run were dropped
    assert [r["epoch"] for r in rows if "checkpoint" in r] == [0, 1]
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if "img/s" in line]
    assert len(progress) == 2 and all(len(line) < 160 for line in progress)
    assert all(word in progress[0] for word in ("epoch 2/2 [1/2]", "loss", "acc", "lr", "data", "mem", "eta"))
    assert any("saved" in line and "checkpoint.pth" in line for line in lines)
    assert lines[-1].startswith("done: epochs 2-2 in ") and str(tmp_path) in lines[-1]
    # loss.png: every term against step, drawn from log.jsonl
    png = Image.open(tmp_path / "loss.png")
    assert png.format == "PNG" and png.size == (960, 990)  # three panels: losses, accuracies, collapse signals
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps({**r, "loss": r["loss"] * 2} if "iteration" in r else r) + "\n" for r in rows))
    common.plot_log(str(changed), str(tmp_path / "changed.png"))
    common.plot_log(str(tmp_path / "log.jsonl"), str(tmp_path / "again.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(png))
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "changed.png")), np.asarray(png))


def test_bn_batch_above_the_per_process_batch_is_accepted(monkeypatch):
    """Two nodes of 8 GPUs at batch 256 give 16 images per process, under --bn-batch 32: plain BN, no error."""
    monkeypatch.setenv("WORLD_SIZE", "16")
    for module in TRAINERS.values():
        assert module.get_args([]).bn_batch == 32
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit):
        dilo.get_args(["--batch-size", "32", "--bn-batch", "7"])



# --- direct checks of what every trainer copies: EMA, InfoNCE, the cosine schedule (issue 29) ---


def test_ema_update_moves_the_key_encoder_one_minus_m_towards_the_query():
    """p_k <- m p_k + (1 - m) p_q on parameters; the query encoder and every BN buffer untouched."""
    torch.manual_seed(0)
    encoder_q, encoder_k = (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(2))
    encoder_q[1].running_mean.fill_(1.0)
    for p in encoder_q[1].parameters():  # BN's affine parameters differ between the encoders too
        p.data.uniform_(-1, 1)
    q_before, k_before = copy.deepcopy(encoder_q.state_dict()), copy.deepcopy(encoder_k.state_dict())
    common.ema_update(encoder_k, encoder_q, 0.9)
    for name, p_k in encoder_k.named_parameters():
        assert torch.allclose(p_k, 0.9 * k_before[name] + 0.1 * q_before[name], atol=1e-7), name
        assert not torch.allclose(p_k, k_before[name]), name
    for name, value in encoder_q.state_dict().items():
        assert torch.equal(value, q_before[name]), name
    assert torch.equal(encoder_k[1].running_mean, k_before["1.running_mean"])  # buffers: f_k's own passes


def _plain_info_nce(q, k, queue, tau):
    """MoCo eq. 1 row by row in fp64 Python: -log softmax of [q.k+, q.queue] / tau at the positive."""
    losses, hits = [], []
    for i in range(len(q)):
        logits = [float(q[i] @ k[i])] + [float(q[i] @ key) for key in queue]
        top = max(logits) / tau
        losses.append(top + math.log(sum(math.exp(value / tau - top) for value in logits)) - logits[0] / tau)
        hits.append(logits[0] > max(logits[1:]))  # a tie with a negative is a miss
    return np.mean(losses), np.mean(hits)


@pytest.mark.parametrize("name", TRAINERS)
@pytest.mark.parametrize("tau", [0.2, 0.07])
def test_every_info_nce_copy_equals_a_plain_reference(name, tau):
    generator = torch.Generator().manual_seed(0)
    q, k, queue = (F.normalize(torch.randn(n, 16, generator=generator), dim=1) for n in (6, 6, 10))
    k[1] = q[1]  # a clear hit
    q[0] = k[0] = queue[3] = torch.eye(16)[0]  # row 0: a negative ties with the positive, exactly 1 = 1
    loss, acc = TRAINERS[name].info_nce(q, k, queue, tau)
    expected_loss, expected_acc = _plain_info_nce(q.double(), k.double(), queue.double(), tau)
    assert loss.dtype == torch.float32 and float(loss) == pytest.approx(expected_loss, rel=1e-5)
    assert float(acc) == pytest.approx(expected_acc) and 0 < expected_acc < 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as under --amp: still fp32 logits (bf16 matmul: 3e-4 off)
        amp_loss, amp_acc = TRAINERS[name].info_nce(q, k, queue, tau)
    assert amp_loss.dtype == torch.float32 and float(amp_loss) == pytest.approx(float(loss), rel=1e-6)
    assert float(amp_acc) == float(acc)


@pytest.mark.parametrize("name, extra", [("dilo", []), ("dupr", []), ("detco", []), ("insloc", ["--variant", "c4"]),
                                         ("insloc", ["--variant", "fpn"])], ids=["dilo", "dupr", "detco", "insloc-c4", "insloc-fpn"])
def test_bf16_autocast_and_channels_last_train_on_the_cpu(name, extra, tmp_path):
    """The GPU's settings, forced on the CPU: bf16 autocast and NHWC weights and images, two steps."""
    module = TRAINERS[name]
    module.main(module.get_args(SMALL + extra + ["--steps", "2", "--amp", "--channels-last", "--output-dir", str(tmp_path)]))
    rows = read_log(tmp_path / "log.jsonl", events=True)
    assert rows[0]["args"]["amp"] is True and rows[0]["args"]["channels_last"] is True
    steps = [row for row in rows if "iteration" in row]
    assert len(steps) == 2 and all(math.isfinite(row[key]) for row in steps for key in row if key.startswith("loss"))


class _ConstantLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.weight * x.mean(), {"term": x.mean()}


@pytest.mark.parametrize("name", TRAINERS)
def test_every_train_one_epoch_follows_the_cosine_per_iteration(name, tmp_path):
    """lr(epoch, it) = lr * 0.5 * (1 + cos(pi * (epoch + it / steps) / epochs)), set before each step."""
    module = TRAINERS[name]
    args = module.get_args(SMALL + ["--epochs", "3", "--output-dir", str(tmp_path)])
    args.device, args.amp, args.lr_actual, args.steps = torch.device("cpu"), False, 0.5, 4
    model, rows = _ConstantLoss(), []
    groups = [{"params": [model.weight], "lr_scale": 1.0}] if name == "insloc" else [{"params": [model.weight]}]
    optimizer = torch.optim.SGD(groups, lr=0.5)
    loader = [(torch.full((2,), 1.0 + i),) for i in range(6)]  # more batches than --steps
    means = module.train_one_epoch(model, loader, optimizer, 1, args, rows.append)
    expected = [0.5 * 0.5 * (1 + math.cos(math.pi * (1 + it / 4) / 3)) for it in range(4)]
    assert [row["iteration"] for row in rows] == [0, 1, 2, 3]
    assert [row["lr"] for row in rows] == pytest.approx(expected, rel=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected[-1], rel=1e-12)
    assert means["term"] == pytest.approx(2.5)  # the mean of the 4 steps' terms


def test_detect_c4_box_head_is_res5_then_extra_norm_then_pool(tmp_path):
    """MoCo's Res5ROIHeadsExtraNorm on a training-mode batch of RoI features: BN over the batch after
    res5, then average pooling; the extra norm's running statistics move."""
    torch.manual_seed(0)
    head = detect.build_model(_detect_args(tmp_path, "--model", "faster-c4"), 8).roi_heads.box_head.train()
    reference = copy.deepcopy(head)
    x = torch.randn(6, head.res5[0].conv1.in_channels, 14, 14)  # (R, C4, 14, 14) pooled RoIs
    out = head(x)
    y = reference.res5(x)  # (R, C5, 7, 7)
    norm = reference.norm
    expected = F.batch_norm(y, None, None, norm.weight, norm.bias, training=True, eps=norm.eps).mean(dim=(2, 3))
    assert out.shape == (6, head.norm.num_features) and torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, y.mean(dim=(2, 3)), atol=1e-3)  # the norm is not a no-op here
    momentum = norm.momentum
    assert torch.allclose(head.norm.running_mean, momentum * y.mean(dim=(0, 2, 3)), atol=1e-5)



# --- DUPR's patch InfoNCE in row chunks (issue 30) ---


def _patch_inputs(N=6, SS=49, K=300, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    r_q = F.normalize(torch.randn(N, SS, 16, generator=generator), dim=2)
    r_k = F.normalize(r_q + 0.5 * torch.randn(N, SS, 16, generator=generator), dim=2)  # positives: some hits
    queue = F.normalize(torch.randn(K, 16, generator=generator), dim=1)
    return r_q.to(dtype).requires_grad_(), r_k.to(dtype), queue


@pytest.mark.parametrize("valid", [[1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1]], ids=["all-overlap", "two-without"])
@pytest.mark.parametrize("chunk", [1, 49, 64, 10_000])  # 49 and 1 divide the rows, 64 does not, 10,000 > rows
def test_dupr_chunked_patch_info_nce_equals_one_matrix(chunk, valid):
    r_q, r_k, queue = _patch_inputs()
    valid = torch.tensor(valid, dtype=torch.bool)
    loss, acc = dupr.patch_info_nce(r_q, r_k, valid, queue, 0.2, 0)
    grad, = torch.autograd.grad(loss, r_q)
    chunked, chunked_acc = dupr.patch_info_nce(r_q, r_k, valid, queue, 0.2, chunk)
    chunked_grad, = torch.autograd.grad(chunked, r_q)
    loss, chunked = loss.detach(), chunked.detach()
    assert chunked.item() == pytest.approx(loss.item(), rel=1e-6) and chunked_acc.item() == acc.item()
    assert 0 < float(acc) < 1
    assert (chunked_grad - grad).abs().max() <= 1e-6 * grad.abs().max()
    assert not chunked_grad[~valid].any()  # a pair without overlap adds nothing
    with torch.no_grad():  # no gradient wanted: the loss alone
        assert float(dupr.patch_info_nce(r_q, r_k, valid, queue, 0.2, chunk)[0]) == pytest.approx(float(loss), rel=1e-6)


def test_dupr_chunked_patch_info_nce_under_bf16_autocast_stays_fp32():
    r_q, r_k, queue = _patch_inputs(dtype=torch.bfloat16)
    valid = torch.ones(6, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = dupr.patch_info_nce(r_q, r_k, valid, queue, 0.2, 0)
        chunked, _ = dupr.patch_info_nce(r_q, r_k, valid, queue, 0.2, 64)
    exact, _ = dupr.patch_info_nce(r_q.float(), r_k.float(), valid, queue, 0.2, 0)  # no autocast at all
    assert loss.dtype == chunked.dtype == torch.float32
    assert float(chunked) == pytest.approx(float(exact), rel=1e-6) and float(loss) == pytest.approx(float(exact), rel=1e-6)
    grad, = torch.autograd.grad(loss, r_q)
    chunked_grad, = torch.autograd.grad(chunked, r_q)
    assert chunked_grad.dtype == torch.bfloat16 and torch.isfinite(chunked_grad).all()
    assert (chunked_grad.float() - grad.float()).abs().max() <= 1e-2 * grad.float().abs().max()  # bf16 rounding


def test_dupr_training_step_with_patch_chunk_64_equals_one_matrix():
    """One SGD step of DUPR: the same loss and the same updated weights with --patch-chunk 64 and 0."""
    dataset = dupr.TwoViewsWithBoxes(common.ToyWorld(8, 36), dupr.get_args(_DUPR_SMALL))
    torch.manual_seed(0)
    batch = [torch.stack(column) for column in zip(*[dataset[i] for i in range(8)])]
    results = []
    for chunk in ("0", "64"):
        torch.manual_seed(0)
        model = dupr.DUPR(dupr.get_args(_DUPR_SMALL + ["--patch-chunk", chunk]))
        optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.5, momentum=0.9)
        loss, terms = model(*batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        results.append((loss.detach(), terms, model.state_dict()))
    (loss, terms, state), (chunked_loss, chunked_terms, chunked_state) = results
    assert terms["no_overlap"] < 1 and torch.allclose(loss, chunked_loss, atol=1e-5)
    for name in terms:
        assert torch.allclose(terms[name], chunked_terms[name], atol=1e-5), name
    for name, value in state.items():
        assert torch.allclose(value.float(), chunked_state[name].float(), atol=1e-5), name
    assert dupr.get_args([]).patch_chunk * 65537 * 4 / 2**20 == pytest.approx(256, rel=0.01)  # the default: 256 MB


if __name__ == "__main__":
    sys.exit(pytest.main(["-q", __file__]))


# --- the layout: deliberate copies, imports, line length ---

import ast  # noqa: E402
import inspect  # noqa: E402

COPIED = ("info_nce", "train_one_epoch", "to_picture", "setup_distributed", "seed_everything", "peak_memory_mb",
          "make_logger", "load_checkpoint", "save_checkpoint")


@pytest.mark.parametrize("name", COPIED)
def test_the_deliberate_copies_are_identical(name):
    """Each trainer is self-contained, so these functions are copied, not imported: every copy is dupr.py's
    text under one `# Same as dupr.py` line. (insloc.py's save_checkpoint is its own: backbone.pth holds the
    FPN and box head too.)"""
    original = inspect.getsource(getattr(dupr, name))
    for module in (dilo, detco, insloc):
        if module is insloc and name == "save_checkpoint":
            continue
        lines, start = inspect.getsourcelines(getattr(module, name))
        assert "".join(lines) == original, f"{module.__name__}.{name} is not dupr.py's text"
        with open(module.__file__) as f:
            assert f.readlines()[start - 2] == "# Same as dupr.py\n", f"{module.__name__}.{name}: no '# Same as dupr.py'"


def test_trainers_import_only_common_and_libraries_and_lines_fit():
    """The trainers import nothing from tools/ or from each other; no line of the library files is over 120."""
    for name in ("dilo.py", "dupr.py", "detco.py", "insloc.py", "common.py", "detect_finetune.py"):
        with open(os.path.join(HERE, name)) as f:
            text = f.read()
        imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(text))
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"tools", "dilo", "dupr", "detco", "insloc", "detect_finetune"}, (name, imported)
        long = [i + 1 for i, line in enumerate(text.splitlines()) if len(line) > 120]
        assert not long, f"{name}: lines {long} are over 120 characters"


# --- the GPU path (issue 33): its settings on the CPU, the checks that need a GPU, the benchmark command ---

import tools.benchmark  # noqa: E402

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


# ---------------------------------------------------------------------------------------
# The GPU's settings on the CPU: bf16 autocast and channels_last
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["faster-fpn", "mask-fpn"])
def test_detect_bf16_autocast_and_channels_last_train_and_evaluate_on_the_cpu(model, tmp_path):
    """detect_finetune.py --amp --channels-last forced on the CPU: two iterations, PreciseBN, inference and the
    COCO evaluation run; the losses are finite and the weights were trained in NHWC."""
    detect.main(detect.get_args(["--tiny", "--model", model, "--iters", "2", "--train-images", "8", "--test-images",
                                 "2", "--precise-bn-iters", "1", "--workers", "0", "--print-freq", "1", "--amp",
                                 "--channels-last", "--output-dir", str(tmp_path)]))
    rows = [row for row in read_log(tmp_path / "log.jsonl") if "iteration" in row]
    assert [row["iteration"] for row in rows] == [0, 1]
    assert all(math.isfinite(row[key]) for row in rows for key in row if key.startswith("loss"))
    metrics = json.load(open(tmp_path / "metrics.json"))
    assert metrics["protocol"]["amp"] is True and metrics["protocol"]["channels_last"] is True
    for kind in ("bbox", "segm") if model.startswith("mask") else ("bbox",):
        assert all(value == -1 or 0 <= value <= 100 for value in metrics[kind].values()), metrics[kind]
    weights = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    assert weights["backbone.body.conv1.weight"].is_contiguous(memory_format=torch.channels_last)


def test_detect_boxes_stay_fp32_under_bf16_autocast():
    """torchvision decodes boxes in the deltas' dtype; under bf16 autocast that rounds proposals, the ground truth
    matched to them and the detections by up to 4 px at 512-1024 px. Float32BoxCoder decodes the same (bf16) deltas
    in fp32: the boxes that reach RoIAlign (training and inference) and the detections are fp32."""
    generator = torch.Generator().manual_seed(0)
    corner = 600 + 600 * torch.rand(64, 2, generator=generator)
    boxes = torch.cat([corner, corner + 16 + 200 * torch.rand(64, 2, generator=generator)], 1)  # (64, 4) at 600-1416 px
    deltas = (0.1 * torch.randn(64, 4, generator=generator)).bfloat16()  # what a bf16 box regressor gives
    ours = detect.Float32BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(deltas, boxes)
    stock = torchvision.models.detection._utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
    assert ours.dtype == torch.float32 and torch.equal(ours, stock.decode_single(deltas.float(), boxes))
    rounded = stock.decode_single(deltas, boxes)
    assert rounded.dtype == torch.bfloat16 and (rounded.float() - ours).abs().max() >= 2  # what it replaces
    for name in ("faster-fpn", "mask-c4"):
        args = detect.get_args(["--tiny", "--model", name, "--roi-batch-size", "16", "--workers", "0"])
        torch.manual_seed(0)
        model = detect.build_model(args, 8).to(memory_format=torch.channels_last)
        seen = []
        for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
            if pool is not None:
                pool.register_forward_pre_hook(lambda module, inputs: seen.extend(p.dtype for p in inputs[1]))
        images = [torch.rand(3, 96, 80, generator=generator), torch.rand(3, 80, 96, generator=generator)]
        masks = [torch.zeros(1, *image.shape[1:], dtype=torch.uint8) for image in images]
        for mask in masks:
            mask[:, 10:60, 10:50] = 1
        targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1]), "masks": mask}
                   for mask in masks]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model(images, targets)
            assert all(torch.isfinite(value) for value in losses.values()), (name, losses)
            model.eval()
            outputs = model(images)
        assert len(seen) >= 4 and set(seen) == {torch.float32}, (name, seen)  # box (and mask) RoIs, both modes
        assert all(output["boxes"].dtype == torch.float32 for output in outputs)


def test_photometric_under_bf16_autocast_is_the_fp32_path():
    """common.photometric turns autocast off: under bf16 autocast (as --amp) and with NHWC input (as
    --channels-last) its output is fp32 and the fp32 path's, for single views and k-image samples; the blur
    alone under autocast would run in bf16 and be off by more than a bf16 rounding of the range."""
    generator = torch.Generator().manual_seed(0)
    colour = common.draw_colour(16, generator)
    colour[:4, 0], colour[:4, 10] = 1.0, 1.0  # some samples jitter and blur for sure
    for shape in ((16, 3, 40, 36), (16, 2, 3, 24, 24)):
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        reference = common.photometric(x, colour)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = common.photometric(x, colour)
            nhwc = common.photometric(x.to(memory_format=torch.channels_last), colour) if x.dim() == 4 else amp
        assert reference.dtype == amp.dtype == nhwc.dtype == torch.float32
        assert torch.equal(amp, reference)  # exactly: nothing in it ran in bf16
        assert (nhwc - reference).abs().max() <= 1e-5  # another convolution algorithm: fp32 rounding only
    images = torch.rand(8, 3, 32, 32, generator=generator)
    sigma = torch.full((8,), 1.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        blurred_bf16 = common.gaussian_blur(images, sigma)
    assert (blurred_bf16.float() - common.gaussian_blur(images, sigma)).abs().max() > 2 ** -9


def test_roi_align_boxes_keeps_the_boxes_fp32_for_bf16_features():
    """common.roi_align_boxes pools bf16 feature maps (as under --amp) with fp32 box coordinates: the result is
    the fp32 RoIAlign of the same features rounded once to bf16. With the boxes rounded to bf16 (2 px apart
    at 256-512 px) the pooled grid would move by up to a pixel."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 64, 64, generator=generator).bfloat16().to(memory_format=torch.channels_last)
    corner = 130 + 200 * torch.rand(6, 2, generator=generator)
    boxes = torch.cat([corner + 0.37, corner + 40.71], 1)  # (6, 4) above 128 px: not multiples of a bf16 step
    batch_index = torch.tensor([0, 1, 0, 1, 0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = common.roi_align_boxes(features, boxes, 7, 8, 2, batch_index)
    rois = torch.cat([batch_index[:, None].float(), boxes], 1)
    reference = torchvision.ops.roi_align(features.float(), rois, 7, 1 / 8, 2, aligned=True).bfloat16()
    assert pooled.dtype == torch.bfloat16 and torch.equal(pooled, reference)
    rounded = torch.cat([batch_index[:, None].float(), boxes.bfloat16().float()], 1)
    assert not torch.equal(torchvision.ops.roi_align(features.float(), rounded, 7, 1 / 8, 2, aligned=True).bfloat16(),
                           reference)


# ---------------------------------------------------------------------------------------
# The benchmark command: python -m tools.benchmark
# ---------------------------------------------------------------------------------------


def test_benchmark_table_gives_every_value_as_a_ratio_to_moco_v2():
    values = dict(step_time_s=0.5, img_per_s=64.0, data_time_ms=2.0, memory_mb=1000.0, loader_ms=5.0)
    rows = [{"label": label, "command": f"{name}.py " + " ".join(extra), **{k: v * (1 + i) for k, v in values.items()}}
            for i, (label, name, extra) in enumerate(tools.benchmark.ROWS)]
    rows[2] = {**rows[2], "data_time_ms": 0.0}
    rows[3] = {"label": "DetCo", "command": "detco.py", "error": "error: out of memory"}
    lines = tools.benchmark.table(rows).splitlines()
    assert len(lines) == 2 + len(tools.benchmark.ROWS)
    assert lines[2] == ("| MoCo v2 | `dilo.py --paste-prob 0` | 0.500 (1.00x) | 64.0 (1.00x) | 2.0 ms (1.00x) | "
                        "1,000 MB (1.00x) | 5.00 ms/item (1.00x) |")
    assert "| 1.000 (2.00x) | 128.0 (2.00x) |" in lines[3] and "0.0 ms (0.00x)" in lines[4]
    assert lines[5] == "| DetCo | `detco.py` | failed: error: out of memory |"


@slow
def test_benchmark_command_runs_every_trainer_at_the_smallest_size(tmp_path):
    """`python -m tools.benchmark --tiny` at 32 px, batch 8, 2 steps: a row per trainer (InsLoc both variants),
    each value finite and a ratio to the MoCo v2 row, whose ratios are 1.00; the JSON holds the same table."""
    command = [sys.executable, "-m", "tools.benchmark", "--tiny", "--steps", "2", "--image-size", "32", "--batch-size",
               "8", "--workers", "0", "--loader-items", "4", "--output-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(tmp_path / "benchmark.json"))
    assert [row["label"] for row in report["rows"]] == ["MoCo v2", "DiLo", "DUPR", "DetCo", "InsLoc C4", "InsLoc FPN"]
    for row in report["rows"]:
        assert len(row["steps"]) == 2 and row["warmup"] == 1 and row["args"]["image_size"] == 32
        assert all(math.isfinite(row[key]) and row[key] >= 0 for key, _, _ in tools.benchmark.COLUMNS)
        assert row["step_time_s"] > 0 and row["memory_mb"] > 0 and row["loader_ms"] > 0
    assert [row["args"]["variant"] for row in report["rows"][4:]] == ["c4", "fpn"]
    assert report["rows"][0]["args"]["paste_prob"] == 0 and report["rows"][1]["args"]["paste_prob"] > 0
    moco = next(line for line in result.stdout.splitlines() if line.startswith("| MoCo v2 |"))
    assert moco.count("(1.00x)") == len(tools.benchmark.COLUMNS) - (report["rows"][0]["data_time_ms"] == 0)
    assert report["table"] in result.stdout and "CPU" in report["device"]


# ---------------------------------------------------------------------------------------
# On a GPU (skipped without one; CI is CPU-only). docs/running.md, "What only a GPU runs", lists what they cover.
# ---------------------------------------------------------------------------------------

PAPER_SHAPE = [("dilo", []), ("dupr", []), ("detco", []), ("insloc", ["--variant", "c4"]),
               ("insloc", ["--variant", "fpn"])]


@needs_gpu
@pytest.mark.parametrize("name, extra", PAPER_SHAPE, ids=["dilo", "dupr", "detco", "insloc-c4", "insloc-fpn"])
def test_gpu_trainer_five_steps_at_the_papers_shape(name, extra, tmp_path):
    """ResNet-50, 224 px (InsLoc: 256 canvas), batch 64 in one process (ghost BN in 2 groups of 32), K 65536,
    bf16 autocast, channels_last: 5 steps with finite losses; prints the peak memory (torch.cuda max allocated)."""
    size = "256" if name == "insloc" else "224"
    command = [sys.executable, f"{name}.py", "--data", "synthetic", "--arch", "resnet50", "--image-size", size,
               "--batch-size", "64", "--steps", "5", "--epochs", "1", "--amp", "--channels-last", "--workers", "4",
               "--print-freq", "1", "--output-dir", str(tmp_path)] + extra
    result = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_log(tmp_path / "log.jsonl", events=True)
    assert rows[0]["args"]["amp"] is True and rows[0]["args"]["channels_last"] is True
    steps = [row for row in rows if "iteration" in row]
    assert [row["iteration"] for row in steps] == list(range(5))
    assert all(math.isfinite(row[key]) for row in steps for key in row if key.startswith(("loss", "acc")))
    total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
    assert all(0 < row["memory_mb"] < total_mb for row in steps)
    print(f"{name} {' '.join(extra)}: peak {max(row['memory_mb'] for row in steps):,.0f} MB, "
          f"median step {sorted(row['step_time'] for row in steps)[2]:.3f} s on {torch.cuda.get_device_name(0)}")


@needs_gpu
def test_gpu_colour_augmentation_and_ghost_batchnorm_equal_the_cpu():
    """common.photometric and ghost BatchNorm (forward, running statistics, gradients) on CUDA equal the CPU's in
    fp32 to 1e-5, also with NHWC input. TF32 is turned off for the comparison: cuDNN may use it for the blur's
    convolution by default (torch.backends.cudnn.allow_tf32), which is a 1e-3 difference, not a bug."""
    generator = torch.Generator().manual_seed(0)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        colour = common.draw_colour(32, generator)
        for shape in ((32, 3, 56, 48), (32, 2, 3, 32, 32)):
            x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
            cpu = common.photometric(x, colour)
            cuda = common.photometric(x.cuda(), colour.cuda())
            assert cuda.dtype == torch.float32 and (cuda.cpu() - cpu).abs().max() <= 1e-5
            if x.dim() == 4:
                nhwc = common.photometric(x.cuda().to(memory_format=torch.channels_last), colour.cuda())
                assert (nhwc.cpu() - cpu).abs().max() <= 1e-5
        for shape in ((16, 8, 5, 5), (16, 8)):  # BatchNorm2d, BatchNorm1d: 4 ghost groups of 4 samples
            x = torch.randn(shape, generator=generator) * torch.linspace(0.5, 3, 16).view(-1, *[1] * (len(shape) - 1))
            results = []
            for device, memory_format in (("cpu", torch.contiguous_format), ("cuda", torch.contiguous_format),
                                          ("cuda", torch.channels_last)):
                if memory_format == torch.channels_last and x.dim() != 4:
                    continue
                bn = nn.BatchNorm2d(8) if x.dim() == 4 else nn.BatchNorm1d(8)
                ghost = common.convert_to_ghost_batchnorm(nn.Sequential(bn), 16, 4).to(device).train()
                ghost[0].weight.data.copy_(torch.linspace(0.5, 2, 8))
                inputs = x.to(device, memory_format=memory_format).requires_grad_(True)
                out = ghost(inputs)
                (out * torch.arange(out.numel(), device=device).view_as(out).sin()).sum().backward()
                results.append([t.detach().cpu() for t in (out, ghost[0].running_mean, ghost[0].running_var,
                                                           inputs.grad, ghost[0].weight.grad, ghost[0].bias.grad)])
            for other in results[1:]:
                for a, b in zip(results[0], other):
                    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _detect_command(nproc, model, out):
    """detect_finetune.py under torchrun: R50, 20 iterations of 4 images per GPU, bf16, NHWC, PreciseBN 5."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "detect_finetune.py", "--dataset", "synthetic", "--model", model, "--arch", "resnet50", "--iters", "20",
            "--batch-size", str(4 * nproc), "--train-images", "160", "--test-images", "16", "--precise-bn-iters", "5",
            "--workers", "4", "--print-freq", "5", "--amp", "--channels-last", "--output-dir", str(out)]


@needs_gpu
@pytest.mark.parametrize("model", ["faster-c4", "mask-fpn"])
def test_gpu_detect_twenty_iterations_under_torchrun(model, tmp_path):
    """torchrun --nproc_per_node=1: 20 iterations of R50 Faster R-CNN C4 / Mask R-CNN FPN in bf16 and NHWC,
    PreciseBN, inference and evaluation; metrics.json written. (At world size 1 there is no process group: NCCL
    and SyncBatchNorm need two GPUs, test_gpu_two_processes_equal_one_with_bn_batch.)"""
    result = subprocess.run(_detect_command(1, model, tmp_path), cwd=HERE, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [row for row in read_log(tmp_path / "log.jsonl") if "iteration" in row]
    assert rows[-1]["iteration"] == 19 and all(math.isfinite(row["loss"]) for row in rows)
    metrics = json.load(open(tmp_path / "metrics.json"))
    assert metrics["protocol"]["device"] == "cuda:0" and metrics["protocol"]["amp"] and metrics["test_images"] == 16
    assert "precise BN: statistics of" in result.stdout and ("segm" in metrics) == model.startswith("mask")


GHOST_RANKS_CUDA = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {here!r})
rank = int(os.environ["RANK"])
torch.cuda.set_device(rank)  # before NCCL starts: one GPU per process
dist.init_process_group("nccl")
import {module} as tests
results = {{method: tests._ghost_bn_steps(method, model_class, extra, device=torch.device("cuda", rank))
           for method, model_class, extra in tests.GHOST_METHODS}}
if rank == 0:
    torch.save(results, {out!r})
dist.destroy_process_group()
"""


@needs_two_gpus
def test_gpu_two_processes_equal_one_with_bn_batch(tmp_path):
    """Two NCCL processes on two GPUs (local batch 4, per-GPU BN) against one GPU with --bn-batch 4 (ghost BN):
    the same loss, gradients and running statistics for 2 SGD steps of DiLo, DetCo and InsLoc-FPN (fp64, given the
    same samples and keys). Then detect_finetune.py under torchrun --nproc_per_node=2: NCCL, SyncBatchNorm and
    PreciseBN over both GPUs, metrics written."""
    script = tmp_path / "ranks.py"
    script.write_text(GHOST_RANKS_CUDA.format(here=HERE, module=__name__, out=str(tmp_path / "two.pth")))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29641", str(script)]
    result = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(tmp_path / "two.pth", weights_only=True)
    for method, model_class, extra in GHOST_METHODS:
        one = _ghost_bn_steps(method, model_class, extra, device=torch.device("cuda", 0))
        assert (one["loss"] - two[method]["loss"]).abs().max() < 1e-6, method
        assert (one["grads"] - two[method]["grads"]).abs().max() < 1e-6 * two[method]["grads"].abs().max(), method
        for name, value in one["statistics"].items():
            assert (value - two[method]["statistics"][name]).abs().max() < 1e-6, (method, name)
    result = subprocess.run(_detect_command(2, "mask-fpn", tmp_path / "detect"), cwd=HERE, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.load(open(tmp_path / "detect" / "metrics.json"))
    assert metrics["protocol"]["world_size"] == 2 and metrics["test_images"] == 16


# --- run health (issue 34): collapse signals, the collapse warning, the k-NN monitor ---

import types  # noqa: E402

# --- the signals ---


def test_collapse_signals_of_identical_and_orthogonal_embeddings():
    """Identical vectors: std 0, cosine 1. The 128 one-hot vectors of R^128 (orthogonal): every dimension holds
    one 1 and 127 zeros, whose std (unbiased) is 1/sqrt(128), the spread-out value; cosine 0."""
    same = torch.nn.functional.normalize(torch.randn(1, 128), dim=1).expand(32, -1)
    signals = common.collapse_signals({"q": same})
    assert set(signals) == {"std_q", "cos_q"}
    assert float(signals["std_q"]) == pytest.approx(0.0, abs=1e-7)
    assert float(signals["cos_q"]) == pytest.approx(1.0, abs=1e-6)
    orthogonal = common.collapse_signals({"q": torch.eye(128)})
    assert float(orthogonal["std_q"]) == pytest.approx(1 / math.sqrt(128), rel=1e-6)
    assert float(orthogonal["cos_q"]) == pytest.approx(0.0, abs=1e-7)
    # P embeddings per image (DUPR's patches): the cosine is over rows of DIFFERENT images only. Images that are
    # each one repeated one-hot vector: rows within an image agree (cosine 1), rows of two images are orthogonal.
    per_image = torch.eye(8)[:, None, :].expand(8, 5, 8)  # (N 8, P 5, D 8)
    assert float(common.collapse_signals({"r": per_image})["cos_r"]) == pytest.approx(0.0, abs=1e-7)


def test_collapse_signals_equal_a_plain_computation():
    """Random unit vectors (N, P, D) against numpy: the per-dimension std over all rows, averaged; the mean of
    z_a . z_b over every pair of rows from different images."""
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(6, 4, 16) + 0.5, dim=-1)
    signals = common.collapse_signals({"patch": z, "image": z[:, 0]})
    rows = z.numpy().astype(np.float64)
    assert float(signals["std_patch"]) == pytest.approx(rows.reshape(-1, 16).std(axis=0, ddof=1).mean(), rel=1e-5)
    pairs = [rows[i, p] @ rows[j, r] for i in range(6) for j in range(6) if i != j for p in range(4) for r in range(4)]
    assert float(signals["cos_patch"]) == pytest.approx(np.mean(pairs), rel=1e-5)
    image = rows[:, 0]
    assert float(signals["cos_image"]) == pytest.approx(np.mean([image[i] @ image[j] for i in range(6)
                                                                  for j in range(6) if i != j]), rel=1e-5)
    assert float(signals["std_image"]) == pytest.approx(image.std(axis=0, ddof=1).mean(), rel=1e-5)
    # under bf16 autocast the embeddings arrive in bf16; the signals are fp32 and need no gradient
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = common.collapse_signals({"q": z[:, 0].bfloat16().requires_grad_()})
    assert half["std_q"].dtype == torch.float32 and not half["std_q"].requires_grad


def test_collapse_warning_fires_once_after_a_sustained_stretch():
    """COLLAPSED_STEPS steps in a row with a std_ signal below COLLAPSED_STD: one line, once; a healthy step
    restarts the count; terms without std_ never count."""
    args = types.SimpleNamespace(is_main=False)
    low, high = common.COLLAPSED_STD / 2, common.COLLAPSED_STD * 2
    for _ in range(common.COLLAPSED_STEPS - 1):
        assert common.collapse_warning({"std_p2": low, "std_p3": high, "loss": 1.0}, args) is None
    assert common.collapse_warning({"std_p2": high, "std_p3": high}, args) is None  # the stretch is broken
    lines = [common.collapse_warning({"std_p2": high, "std_p3": low, "cos_p3": 0.999}, args)
             for _ in range(3 * common.COLLAPSED_STEPS)]
    assert [i for i, line in enumerate(lines) if line] == [common.COLLAPSED_STEPS - 1]
    line = lines[common.COLLAPSED_STEPS - 1]
    assert line.startswith("warning: ") and "\n" not in line and "std_p3" in line and "std_p2" not in line
    assert "docs/logs.md" in line
    assert all(common.collapse_warning({"acc": 0.0, "loss": 9.0}, types.SimpleNamespace()) is None for _ in range(50))


class _Collapsed(torch.nn.Module):
    """A model whose std_ signal says "collapsed" at every step."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.weight * x.mean(), {"loss": x.mean(), "std_q": torch.tensor(0.001), "cos_q": torch.tensor(1.0)}


@pytest.mark.parametrize("name", TRAINERS)
def test_every_train_one_epoch_warns_once_and_logs_it(name, tmp_path, capsys):
    """The warning rule counts training steps across epochs (not log rows: --print-freq 100 here), writes one
    warning row to the log and one stderr line, and the training goes on to the last step."""
    module = TRAINERS[name]
    args = module.get_args(SMALL + ["--epochs", "3", "--print-freq", "100", "--output-dir", str(tmp_path)])
    args.device, args.amp, args.lr_actual, args.steps, args.is_main = torch.device("cpu"), False, 0.1, 8, True
    model, rows = _Collapsed(), []
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr_scale": 1.0}], lr=0.1)
    loader = [(torch.full((2,), 1.0 + i),) for i in range(8)]
    for epoch in range(3):  # 24 steps: the 20th is in epoch 2 (8 + 8 + 4)
        module.train_one_epoch(model, loader, optimizer, epoch, args, rows.append)
    warnings = [row for row in rows if row.get("event") == "warning"]
    assert len(warnings) == 1 and warnings[0]["epoch"] == (common.COLLAPSED_STEPS - 1) // 8
    assert capsys.readouterr().err.count("warning: the query embeddings look collapsed") == 1
    assert sum("iteration" in row for row in rows) == 6  # first and last step of each epoch


@pytest.mark.parametrize("name", TRAINERS)
def test_every_trainer_logs_the_signals_of_each_embedding(name, tmp_path):
    """Every progress row has std_<embedding> and cos_<embedding> for each embedding the loss uses; the console
    shows the smallest std."""
    names = {"dilo": ["q"], "dupr": ["image_conv2", "image_conv3", "image_conv4", "image_conv5", "patch_conv4",
                                     "patch_conv5"],
             "detco": [f"{kind}_res{level}" for kind in ("global", "local") for level in range(2, 6)],
             "insloc": ["p2", "p3", "p4", "p5"]}[name]
    flags = ["--steps", "2", "--output-dir", str(tmp_path)] + (["--variant", "fpn"] if name == "insloc" else [])
    module = TRAINERS[name]
    module.main(module.get_args(SMALL + flags))
    rows = read_log(tmp_path / "log.jsonl")
    progress = [row for row in rows if "iteration" in row]
    assert len(progress) == 2
    for row in progress:
        assert {key for key in row if key.startswith(("std_", "cos_"))} == {f"{s}_{n}" for s in ("std", "cos")
                                                                             for n in names}
        assert all(0 <= row[f"std_{n}"] < 0.2 and -1 <= row[f"cos_{n}"] <= 1 for n in names)
    assert Image.open(tmp_path / "loss.png").size == (960, 990)  # a third panel: the signals


# --- the warning on real runs ---


def _first_steps(module, flags, steps, tmp_path, monkeypatch):
    """`module` --tiny for `steps` steps in this process, as the first epoch of a 100-epoch run (the lr stays
    at its peak), stopped there: its log rows and events."""
    train_one_epoch = module.train_one_epoch

    def first_epoch_only(model, loader, optimizer, epoch, *rest):
        if epoch > 0:
            raise KeyboardInterrupt
        return train_one_epoch(model, loader, optimizer, epoch, *rest)

    monkeypatch.setattr(module, "train_one_epoch", first_epoch_only)
    with pytest.raises(SystemExit, match="interrupted in epoch 2"):
        module.main(module.get_args(["--tiny", "--steps", str(steps), "--epochs", "100", "--workers", "0",
                                     "--output-dir", str(tmp_path)] + flags))
    monkeypatch.setattr(module, "train_one_epoch", train_one_epoch)
    return read_log(tmp_path / "log.jsonl", events=True)


def test_collapse_warning_on_a_real_collapse_in_8_steps(tmp_path, capsys, monkeypatch):
    """The default suite's short variant of the slow test below, with a rule 3x looser than the trainers' (std below
    0.01 for 3 steps; MoCo v2 stays above 0.028): insloc.py --tiny --variant fpn --head-lr-scale 1 is below 0.01
    from step 3 or 4 (docs/logs.md) and is warned about within 8 steps; dilo.py --paste-prob 0 is not."""
    monkeypatch.setattr(common, "COLLAPSED_STD", 0.01)
    monkeypatch.setattr(common, "COLLAPSED_STEPS", 3)
    rows = _first_steps(insloc, ["--variant", "fpn", "--head-lr-scale", "1"], 8, tmp_path / "collapsed", monkeypatch)
    assert [row for row in rows if row.get("event") == "warning"], [row.get("std_p5") for row in rows]
    assert capsys.readouterr().err.count("warning: the query embeddings look collapsed") == 1
    rows = _first_steps(dilo, ["--paste-prob", "0"], 8, tmp_path / "healthy", monkeypatch)
    assert not [row for row in rows if row.get("event") == "warning"], [row.get("std_q") for row in rows]


@slow
def test_collapse_warning_on_insloc_fpn_and_not_on_healthy_tiny_runs(tmp_path, monkeypatch):
    """The issue's check, at the --tiny recipe: insloc.py --variant fpn --head-lr-scale 1 warns within its first
    40 steps (at step 31: docs/logs.md). dilo.py --paste-prob 0 (MoCo v2) and the other trainers' tiny runs do not,
    over 20 steps under a stricter rule (below 0.003 for 10 steps in a row: it fires on whatever the real rule
    would fire on by step 30). About 2 minutes on 2 cores."""
    rows = _first_steps(insloc, ["--variant", "fpn", "--head-lr-scale", "1"], 40, tmp_path / "fpn", monkeypatch)
    warned = [row for row in rows if row.get("event") == "warning"]
    assert len(warned) == 1, [row.get("std_p2") for row in rows if "iteration" in row]
    monkeypatch.setattr(common, "COLLAPSED_STEPS", 10)
    for name, flags in (("dilo", ["--paste-prob", "0"]), ("dilo", []), ("dupr", []), ("detco", []), ("insloc", []),
                        ("insloc", ["--variant", "fpn"])):
        rows = _first_steps(TRAINERS[name], flags, 20, tmp_path / f"{name}{len(flags)}", monkeypatch)
        assert not [row for row in rows if row.get("event") == "warning"], (name, flags)


# --- the k-NN monitor ---


def _separable_folder(root, per_class=(12, 6)):
    """train/ and val/ with two classes: noisy reddish and noisy bluish 40 x 40 images."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for label, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
            os.makedirs(root / split / label)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return str(root)


def _knn_args(data, **more):
    args = types.SimpleNamespace(knn_every=1, knn_data=data, knn_images=[24, 12], data="synthetic", image_size=32,
                                 epochs=1, batch_size=8, workers=0, device=torch.device("cpu"), amp=False,
                                 channels_last=False, is_main=True, world_size=1)
    vars(args).update(more)
    return args


def test_knn_top1_equals_a_plain_weighted_vote():
    """Weighted k-NN on known features: each val point's k nearest train points vote exp(sim / T)."""
    torch.manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    train_labels = torch.randint(0, 3, (50,))
    val = torch.nn.functional.normalize(torch.randn(30, 8), dim=1)
    val_labels = torch.randint(0, 3, (30,))
    correct = 0
    for v, label in zip(val, val_labels):
        similarity = (train @ v).tolist()
        nearest = sorted(range(50), key=lambda j: -similarity[j])[:20]
        votes = [sum(math.exp(similarity[j] / 0.07) for j in nearest if train_labels[j] == c) for c in range(3)]
        correct += int(np.argmax(votes) == label)
    assert common.knn_top1(train, train_labels, val, val_labels) == pytest.approx(correct / 30)
    assert common.knn_top1(train, train_labels, train, train_labels, k=1) == 1.0  # each point is its own neighbour


def test_knn_monitor_is_above_chance_on_a_separable_folder_and_touches_nothing(tmp_path, capsys):
    """An untrained resnet18 trunk's pooled features tell reddish from bluish images (chance 0.5). The monitor
    leaves the weights, BN statistics, training mode and the global random stream as they were."""
    torch.manual_seed(0)
    backbone = common.ResNetTrunk("resnet18").train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    rng = torch.get_rng_state()
    result = common.knn_monitor(backbone, 0, _knn_args(_separable_folder(tmp_path / "data")))
    assert result["knn_top1"] > 0.9  # 12 val images, chance 0.5
    assert backbone.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert "k-NN top-1" in capsys.readouterr().out
    # only every E-th epoch, and after the last
    args = _knn_args("synthetic", knn_every=3, epochs=5)
    assert common.knn_monitor(backbone, 0, args) == {} and common.knn_monitor(backbone, 1, args) == {}


def test_knn_monitor_on_the_toy_world_labels():
    """--knn-data synthetic: labels are the largest object's category (1..8); top-1 is a share of the val set."""
    train, val = common.knn_sets("synthetic", 16, 8, 32)
    assert len(train) == 16 and len(val) == 8
    image, label = val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and 0 <= label <= 8
    _, target = common.ToyWorld(8, 32 * 8 // 7, "val")[0]
    assert label == int(target["labels"][target["masks"].sum((1, 2)).argmax()])


def test_knn_data_must_be_class_folders(tmp_path, capsys):
    flat = tmp_path / "flat"
    for split in ("train", "val"):
        os.makedirs(flat / split)
        Image.new("RGB", (8, 8)).save(flat / split / "a.png")
    for flags in (["--knn-every", "1", "--knn-data", str(flat)], ["--knn-every", "-1"], ["--knn-images", "0", "5"]):
        with pytest.raises(SystemExit) as stopped:
            dilo.get_args(["--tiny"] + flags)
        assert stopped.value.code == 2
    assert "--knn-data" in capsys.readouterr().err


def test_knn_every_changes_no_weight_and_is_not_part_of_the_recipe(tmp_path):
    """Same seed, with and without --knn-every 1: the same checkpoint after 2 epochs (weights, BN statistics,
    queue, SGD momentum). The epoch rows carry knn_top1; a resume may switch the monitor on."""
    flags = SMALL + ["--steps", "3", "--epochs", "2", "--print-freq", "10"]
    knn = ["--knn-every", "1", "--knn-images", "32", "16"]
    dilo.main(dilo.get_args(flags + ["--output-dir", str(tmp_path / "off")]))
    dilo.main(dilo.get_args(flags + knn + ["--output-dir", str(tmp_path / "on")]))
    off, on = (torch.load(tmp_path / run / "checkpoint.pth", weights_only=True) for run in ("off", "on"))
    assert off["model"].keys() == on["model"].keys()
    assert all(torch.equal(off["model"][k], on["model"][k]) for k in off["model"])
    for index, buffers in off["optimizer"]["state"].items():
        assert torch.equal(buffers["momentum_buffer"], on["optimizer"]["state"][index]["momentum_buffer"])
    epochs = [row for row in read_log(tmp_path / "on" / "log.jsonl") if "checkpoint" in row]
    assert len(epochs) == 2 and all(0 <= row["knn_top1"] <= 1 and row["knn_s"] > 0 for row in epochs)
    assert not any("knn_top1" in row for row in read_log(tmp_path / "off" / "log.jsonl"))
    dilo.main(dilo.get_args(flags + ["--epochs", "3"] + knn + ["--output-dir", str(tmp_path / "off")]))  # resumes
    assert "knn_top1" in read_log(tmp_path / "off" / "log.jsonl")[-1]


KNN_TWO_RANKS = """
import sys, types, torch, torch.distributed as dist
sys.path.insert(0, {here!r})
import common
dist.init_process_group("gloo")
torch.manual_seed(0)
backbone = common.ResNetTrunk("resnet18")
args = types.SimpleNamespace(knn_every=1, knn_data="synthetic", knn_images=[41, 19], data="synthetic", image_size=32,
                             epochs=1, batch_size=8, workers=0, device=torch.device("cpu"), amp=False,
                             channels_last=False, is_main=dist.get_rank() == 0, world_size=dist.get_world_size())
top1 = common.knn_monitor(backbone, 0, args)["knn_top1"]
print(f"rank {{dist.get_rank()}} top1 {{top1}}", flush=True)  # one write (the suite runs unbuffered)
dist.destroy_process_group()
"""


def test_knn_monitor_split_over_two_ranks_gives_the_one_process_result(tmp_path):
    """torchrun --nproc_per_node=2: each rank extracts every other image (odd counts: 41 and 19), the features
    are all-gathered, and both ranks get the top-1 that one process gets."""
    torch.manual_seed(0)
    backbone = common.ResNetTrunk("resnet18")
    one = common.knn_monitor(backbone, 0, _knn_args("synthetic", knn_images=[41, 19], is_main=False))["knn_top1"]
    script = tmp_path / "knn.py"
    script.write_text(KNN_TWO_RANKS.format(here=HERE))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    tops = [float(top) for top in re.findall(r"rank \d top1 ([0-9.]+)", result.stdout)]  # the ranks' lines may interleave
    assert len(tops) == 2 and tops[0] == tops[1] == pytest.approx(one)
    assert "world size 2" in result.stdout
