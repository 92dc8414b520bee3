"""An independent implementation of the IG-CAM contract in torch float64 with autograd, and the random models' set-up
(tests only)."""
import copy
import hashlib

import numpy as np
import torch
import torch.nn.functional as F


class ReferencePath:
    """The contract's activations and gradients at points of the straight path, by autograd in `dtype`, one image
    and one point at a time, cached: several quadrature rules on one model share their passes. `reshape` turns the
    layer's output (and its gradient) into [1, K, h, w], as pytorch-grad-cam's reshape_transform does."""

    def __init__(self, model, layer, dtype=torch.float64, reshape=None):
        self.model = copy.deepcopy(model).to(dtype).eval()
        self.dtype = dtype
        self.reshape = reshape or (lambda t: t)
        self._captured = []
        dict(self.model.named_modules())[layer].register_forward_hook(lambda m, i, o: self._captured.append(o))
        self._points = {}

    def point(self, image: torch.Tensor, base: torch.Tensor, alpha: float, target):
        """(activation, gradient of the target's score with respect to it) at base + alpha (image - base). `target`:
        a class index, or a function of the model's output for the image (its batch of one removed: a tensor, or a
        dict or list of tensors) giving the score."""
        key = (hashlib.sha1(image.numpy().tobytes() + base.numpy().tobytes()).hexdigest(), float(alpha),
               target)  # a function as a key, not its id: a collected function's id is reused
        if key not in self._points:
            self._captured.clear()
            x = (base + float(alpha) * (image - base))[None].clone().requires_grad_(True)
            output = self.model(x)
            score = output[0, target] if isinstance(target, int) else target(unbatched(output))
            (grad,) = torch.autograd.grad(score, self._captured[0])
            self._points[key] = (self.reshape(self._captured[0].detach())[0], self.reshape(grad)[0])
        return self._points[key]

    def maps(self, images, targets, alphas, weights, baseline, subtract) -> np.ndarray:
        return contract_maps(self.point, images, targets, alphas, weights, baseline, subtract, self.dtype)


def contract_maps(point, images, targets, alphas, weights, baseline, subtract, dtype=torch.float64) -> np.ndarray:
    """Maps [B, H, W] following README "The method" literally, from `point(image, base, alpha, target)` ->
    (activation [K, h, w], its gradient) at base + alpha (image - base)."""
    images = torch.as_tensor(np.array(images), dtype=dtype)
    base = torch.as_tensor(np.array(baseline), dtype=dtype).expand_as(images)
    maps = []
    for image, x0, target in zip(images, base, targets):
        target = target if callable(target) else int(target)
        a0 = point(image, x0, 0.0, target)[0] if subtract else 0
        total = 0
        for alpha, weight in zip(alphas, weights):
            a, g = point(image, x0, alpha, target)
            total = total + float(weight) * F.relu((g.mean(dim=(1, 2))[:, None, None] * (a - a0)).sum(0))
        size = images.shape[-2:]
        maps.append(F.interpolate(total[None, None], size=size, mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(maps).numpy()


def unbatched(output):
    """A model's output for a batch of one without its batch dim: a tensor, or dicts and lists of them (nested)."""
    if isinstance(output, dict):
        return {key: unbatched(value) for key, value in output.items() if value is not None}
    if isinstance(output, (list, tuple)):
        return [unbatched(value) for value in output]
    return output[0] if isinstance(output, torch.Tensor) else output


def igcam_reference(model, layer, images, targets, alphas, weights, baseline, subtract, dtype=torch.float64,
                    reshape=None):
    """Maps [B, H, W] of the contract (see ReferencePath), float64 by default."""
    return ReferencePath(model, layer, dtype, reshape).maps(images, targets, alphas, weights, baseline, subtract)


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
