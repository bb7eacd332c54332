"""The pipeline's stages, one module each, run as `python -m stages NAME`; lib/ holds what they share."""
