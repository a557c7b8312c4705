"""LiveLens clients."""
