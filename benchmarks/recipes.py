"""The peers' recipes: how people compute these maps in PyTorch today (the authors' official recipe, a tuned one,
and pytorch-grad-cam's Grad-CAM), each computing the same map as the engine so that timings compare equal work."""
from __future__ import annotations


def official_recipe(model, layer, image, target, alphas):
    """The authors' notebook: one batch of interpolated images (black baseline), forward + backward with the
    parameters' gradients on, channel weights from the layer's gradient, sum over steps."""
    import torch.nn.functional as F

    captured = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        scores = model(alphas[:, None, None, None] * image[None])
        activation = captured[0]
        activation.retain_grad()
        scores[:, target].sum().backward()
        step_maps = F.relu((activation.grad.mean(dim=(2, 3), keepdim=True) * activation).sum(1, keepdim=True))
        coarse = step_maps.sum(0, keepdim=True) / len(alphas)
        return F.interpolate(coarse, size=image.shape[-2:], mode="bilinear", align_corners=False).detach()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)


def tuned_recipe(model, layer, image, target, alphas):
    """PyTorch as a careful user would write it: parameters frozen, the backbone run without recording, autograd
    only from the target layer's output to the score."""
    import torch
    import torch.nn.functional as F

    captured = []

    def start_graph_here(module, args, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = dict(model.named_modules())[layer].register_forward_hook(start_graph_here)
    try:
        scores = model(alphas[:, None, None, None] * image[None])
        activation = captured[0]
        (grad,) = torch.autograd.grad(scores[:, target].sum(), activation)
        step_maps = F.relu((grad.mean(dim=(2, 3), keepdim=True) * activation.detach()).sum(1, keepdim=True))
        coarse = step_maps.sum(0, keepdim=True) / len(alphas)
        return F.interpolate(coarse, size=image.shape[-2:], mode="bilinear", align_corners=False)
    finally:
        handle.remove()


def pytorch_grad_cam(model, layer):
    """pytorch-grad-cam's GradCAM for the layer, or the reason it cannot be used here."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ModuleNotFoundError as e:
        if e.name == "pytorch_grad_cam":
            return None, ("not installed: PyPI's grad-cam requires torchvision, which has no build for this torch, "
                          "so it is not a dependency of the bench")
        return None, f"not usable here: it imports {e.name}, which is missing"
    except Exception as e:  # torchvision present but not importable with this torch
        return None, f"not usable here: {type(e).__name__}: {e}"
    cam = GradCAM(model=model, target_layers=[dict(model.named_modules())[layer]])
    return (lambda image, target: cam(input_tensor=image[None], targets=[ClassifierOutputTarget(target)])), None


def pytorch_grad_cam_path(grad_cam, image, preprocess, targets, steps):
    """IG-CAM as a pytorch-grad-cam user computes it: `grad_cam` (its GradCAM) called once per interpolated image
    (left rule, m = `steps`, black baseline), its raw step maps captured (its get_cam_image) and summed, upsampled by
    OpenCV as it upsamples; the same quantity as the engine's map. Returns the function computing it for `image`
    (numpy [1, C, H, W]) and `targets` (its target objects)."""
    import cv2
    import numpy as np
    import torch

    from igcam_engine.preprocess import black_input
    from igcam_engine.quadrature import quadrature

    alphas, weights = quadrature("left", steps)
    black = torch.tensor(black_input(preprocess, image.shape[1]), dtype=torch.float32)[:, None, None]
    black = black.expand(image.shape[1:])
    image_t, size = torch.from_numpy(image), image.shape[-2:]
    raw, compute = [], grad_cam.get_cam_image

    def capture(*args, **kwargs):
        raw.append(compute(*args, **kwargs))
        return raw[-1]

    grad_cam.get_cam_image = capture

    def looped():
        raw.clear()
        for alpha in alphas:
            grad_cam(input_tensor=(black + float(alpha) * (image_t[0] - black))[None], targets=targets)
        coarse = sum(w * np.maximum(r[0], 0) for w, r in zip(weights, raw))
        return cv2.resize(np.float32(coarse), (size[1], size[0]))[None]

    return looped
