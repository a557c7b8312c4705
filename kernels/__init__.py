"""LiveLens kernels."""
