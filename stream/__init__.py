"""LiveLens stream."""
