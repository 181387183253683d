"""What the container image runs: the entry point that starts the server with the
image's defaults (`entrypoint`), and the readiness check that warms the kernels up
before a pod takes traffic (`ready`). Standard library only: both start in
milliseconds."""
