"""Inputs: everything untrusted enters here (image sources, URL fetches, PDF pages) under an ImagePolicy."""
