"""The benchmarked workloads, shared by the JAX side and the PyTorch worker (no imports
beyond the standard library: the worker runs in its own interpreter)."""

WORKLOADS = {
    # name: model (a backbone of gml_jax.models), global batch, image size, channels of m_0
    # and m_1, classes
    "cnn_b64": {"model": "small_cnn", "batch": 64, "size": 28, "channels": (1, 3), "classes": 10},
    "cnn_b256": {"model": "small_cnn", "batch": 256, "size": 28, "channels": (1, 3), "classes": 10},
    "resnet18_b8": {"model": "resnet18", "batch": 8, "size": 224, "channels": (3, 3),
                    "classes": 40},
    # The same at a batch that fills a GPU (the device report).
    "resnet18_b32": {"model": "resnet18", "batch": 32, "size": 224, "channels": (3, 3),
                     "classes": 40},
    # NVGesture's I3D pair on 32-frame 112x112 RGB and depth clips; JAX only (the PyTorch
    # reference has no I3D). Not in the default set: a step takes tens of seconds on a CPU.
    "i3d_b8": {"model": "i3d", "batch": 8, "size": 112, "frames": 32, "channels": (3, 1),
               "classes": 25, "torch": False},
}
DEFAULT_WORKLOADS = ("cnn_b64", "cnn_b256", "resnet18_b8")
LEARNING_RATE = 0.01  # plain SGD on both sides: zeroed gradients then freeze exactly
ALPHA, WINDOW = 0.01, 5
