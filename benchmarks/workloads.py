"""The benchmarked workloads, shared by the JAX side and the PyTorch worker (no imports
beyond the standard library: the worker runs in its own interpreter)."""

WORKLOADS = {
    # name: model, global batch, image size, channels of m_0 and m_1, classes
    "cnn_b64": {"model": "cnn", "batch": 64, "size": 28, "channels": (1, 3), "classes": 10},
    "cnn_b256": {"model": "cnn", "batch": 256, "size": 28, "channels": (1, 3), "classes": 10},
    "resnet18_b8": {"model": "resnet18", "batch": 8, "size": 224, "channels": (3, 3),
                    "classes": 40},
}
METHODS = ("vanilla", "random", "guided")
LEARNING_RATE = 0.01  # plain SGD on both sides: zeroed gradients then freeze exactly
ALPHA, WINDOW = 0.01, 5
