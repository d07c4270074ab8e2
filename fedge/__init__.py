"""fedge: federated edge training on Flower, PyTorch and onnxruntime."""
