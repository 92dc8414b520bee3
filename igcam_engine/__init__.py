"""igcam-engine: Integrated Grad-CAM from ONNX graphs with an explicit gradient subgraph.

The runtime (this package) needs numpy and onnxruntime, never torch; `igcam_engine.export` builds bundles.
"""
from igcam_engine.errors import UserError
from igcam_engine.explainer import Explainer
from igcam_engine.quadrature import RULES, quadrature

__all__ = ["Explainer", "UserError", "quadrature", "RULES"]
__version__ = "0.1.0"
