"""Faults between the kernel (or the client) and a sandbox server, injected by a real proxy."""
