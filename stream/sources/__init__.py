"""LiveLens stream/sources."""
