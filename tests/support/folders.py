"""A small bundle and a folder of photos, for the batch and cluster tests."""
import shutil

import torch

from igcam_engine import zoo
from igcam_engine.data import sample_images
from igcam_engine.export import from_torch


def bundle_and_photos(root, count):
    """A small MobileNetV2 bundle (random weights, 64 x 80) and a folder of `count` copies of the sample photos."""
    torch.manual_seed(0)
    model = zoo.mobilenet_v2(num_classes=10, width_mult=0.25).eval()
    bundle = from_torch(model, "features.18", (3, 64, 80), root / "bundle", preprocess="imagenet")
    images = root / "images"
    images.mkdir()
    photos = sample_images()
    for i in range(count):
        shutil.copyfile(photos[i % len(photos)], images / f"photo{i:02d}{photos[i % len(photos)].suffix}")
    return bundle, images
