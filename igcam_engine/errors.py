"""The errors a user can fix, one class per kind, so that every front end answers by type, never by wording.

Each is raised with one line saying what was wrong and what is accepted. The CLI prints it and exits with status 2;
the HTTP service maps the kind to a status code (igcam_engine.apps.protocols.STATUS); batch records store `kind`.
Anything else is a bug and keeps its traceback. `UserError` itself is only the common base: code raises a kind.
"""


class UserError(ValueError):
    """Input the engine cannot accept; the message says what was wrong and what is accepted."""

    kind = "error"


class OptionError(UserError):
    """An option or argument outside what is accepted (a method name, a number out of range, a flag's value)."""

    kind = "bad option"


class InputError(UserError):
    """Data that cannot be used: image bytes, arrays, annotations, a model's results for these inputs."""

    kind = "bad input"


class LimitError(UserError):
    """Input or work larger than a bound (pixels, bytes, memory); the message names the bound and how to raise it."""

    kind = "too large"


class NotFound(UserError):
    """A named file, folder, module or attribute that does not exist."""

    kind = "not found"


class BundleError(UserError):
    """A bundle that cannot be read: missing, corrupted, another format, or graphs that disagree with its manifest."""

    kind = "bad bundle"


class ModelError(UserError):
    """A model the exporter cannot turn into a bundle (an op without a rule, an unsupported layout or output)."""

    kind = "unsupported model"


class Unavailable(UserError):
    """Something this machine lacks: a package, an execution provider, a device feature, a Ray cluster."""

    kind = "unavailable"


KINDS = (OptionError, InputError, LimitError, NotFound, BundleError, ModelError, Unavailable)


def install_hint(extras: str) -> str:
    """How to install what an optional feature needs: the package is installed from its checkout (or a wheel built
    there), not from a registry."""
    return f"install the {extras} extra: pip install '.[{extras}]' in the igcam-engine checkout"
