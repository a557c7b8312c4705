"""LiveLens model."""
