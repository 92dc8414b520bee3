"""An independent implementation of the IG-CAM contract in torch float64 with autograd (tests only)."""
import copy

import numpy as np
import torch
import torch.nn.functional as F


def igcam_reference(model, layer, images, targets, alphas, weights, baseline, subtract):
    """Maps [B, H, W] float64 following README "The method" literally, one image and one step at a time."""
    model = copy.deepcopy(model).double().eval()
    module = dict(model.named_modules())[layer]
    captured = []
    module.register_forward_hook(lambda m, i, o: captured.append(o))

    def activation_and_grad(x, target):
        captured.clear()
        x = x.clone().requires_grad_(True)
        score = model(x)[0, target]
        activation = captured[0]
        (grad,) = torch.autograd.grad(score, activation)
        return activation.detach()[0], grad[0]

    images = torch.as_tensor(np.asarray(images), dtype=torch.float64)
    base = torch.as_tensor(np.asarray(baseline), dtype=torch.float64).expand_as(images)
    maps = []
    for image, x0, target in zip(images, base, np.asarray(targets)):
        a0, _ = activation_and_grad(x0[None], int(target))
        total = 0
        for alpha, weight in zip(alphas, weights):
            a, g = activation_and_grad((x0 + float(alpha) * (image - x0))[None], int(target))
            relative = a - a0 if subtract else a
            total = total + float(weight) * F.relu((g.mean(dim=(1, 2))[:, None, None] * relative).sum(0))
        size = images.shape[-2:]
        maps.append(F.interpolate(total[None, None], size=size, mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(maps).numpy()


def normalized(maps):
    maps = np.asarray(maps, dtype=np.float64)
    low = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - low
    return (maps - low) / np.where(span > 0, span, 1)


def max_normalized_difference(a, b):
    return float(np.abs(normalized(a) - normalized(b)).max())
