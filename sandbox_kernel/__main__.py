"""``python -m sandbox_kernel -f CONNECTION_FILE``: start the Sandbox kernel (kernel.json)."""

from ipykernel.kernelapp import IPKernelApp

from .kernel import SandboxKernel

IPKernelApp.launch_instance(kernel_class=SandboxKernel)
