"""The pipeline's stages, one module per dvc.yaml stage, and the small modules they share."""
