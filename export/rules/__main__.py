"""`python -m igcam_engine.export.rules`: the Markdown list of the ops that have a gradient rule (docs/supported.md)."""
import sys

from igcam_engine.export.rules import supported_ops

sys.stdout.write(supported_ops())
