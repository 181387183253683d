"""Command-line tools around the package: offline wheel bundles for GPU hosts without
network (wheelhouse) and the GPU-test models built without a model hub (models)."""
