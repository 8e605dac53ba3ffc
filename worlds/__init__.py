"""Procedural worlds with exact metrics, beside the trainer: they import it, it never imports them."""
