"""Generation on CAT latents: the DiT (``dit``), rectified flow (``flow``) and sampling (``sampling``)."""
