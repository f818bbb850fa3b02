"""The test suite: `python -m pytest -q test_all.py` (or `python test_all.py`)."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import dilo


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
    dilo.main(dilo.get_args(["--tiny", "--saliency", "rbd", "--steps", "2", "--workers", "0",
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
