"""The Flower layer of fl_unlearn."""
