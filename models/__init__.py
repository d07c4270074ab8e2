"""Networks, a registry by name, and ONNX export.

Submodules are imported explicitly (``fedge.models.registry``, ``fedge.models.export``,
``fedge.models.inference``) so that on-device inference never pulls in torch.
"""
