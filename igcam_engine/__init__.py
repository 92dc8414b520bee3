"""igcam-engine: Integrated Grad-CAM from ONNX graphs with an explicit gradient subgraph.

This package is the runtime core (numpy, Pillow and onnxruntime, never torch). Beside it: igcam_engine.export builds
bundles, igcam_engine.kernels holds the CUDA kernels, igcam_engine.apps the command line, service and batch jobs,
igcam_engine.evaluation the metrics, igcam_engine.benchmarks the measurements and igcam_engine.zoo the reference
architectures. docs/architecture.md draws the house.
"""
from igcam_engine import source_checkout
from igcam_engine.errors import UserError
from igcam_engine.explainer import Explainer, Explanation
from igcam_engine.options import ExplainOptions, Limits
from igcam_engine.quadrature import RULES, quadrature
from igcam_engine.targets import TargetChoice

source_checkout.install(__path__[0])

__all__ = ["Explainer", "Explanation", "ExplainOptions", "Limits", "TargetChoice", "UserError", "quadrature", "RULES"]
__version__ = "0.1.0"
