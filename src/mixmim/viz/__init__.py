"""Pictures: reconstruction grids and training curves."""
