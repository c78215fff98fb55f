"""The Jupyter front-end: :class:`SandboxKernel`, cells run as bash in a sandbox."""

from .kernel import SandboxKernel

__all__ = ["SandboxKernel"]
