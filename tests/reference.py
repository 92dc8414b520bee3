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

    images = torch.as_tensor(np.array(images), dtype=torch.float64)
    base = torch.as_tensor(np.array(baseline), dtype=torch.float64).expand_as(images)
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


def top_classes(model, images, k=1):
    """The k highest-scoring classes per image ([B, k]); explaining a class the model predicts gives a map with
    positive evidence, where an arbitrary class often gives an all-zero (fully ReLU-clipped) map."""
    with torch.no_grad():
        scores = model.float().eval()(torch.as_tensor(np.asarray(images), dtype=torch.float32))
    return torch.argsort(scores, dim=1, descending=True)[:, :k].numpy()


def randomized(model):
    """Non-trivial batch-norm statistics and affine parameters, so that every BN rule really matters, and linear
    layers scaled by fan-in (not torchvision's N(0, 0.01)), so that scores, and maps, are far from 0."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            fan_in = module.weight.shape[1]
            module.weight.data.copy_(torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.2)
    return model.eval()
