"""Small helpers shared by several layers (files, logging)."""
