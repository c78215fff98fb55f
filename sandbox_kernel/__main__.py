"""``python -m sandbox_kernel -f CONNECTION_FILE``: start the Sandbox kernel (kernel.json)."""

from .kernel.kernel import SandboxKernelApp

SandboxKernelApp.launch()
