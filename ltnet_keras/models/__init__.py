"""G_F / G_B (VoxelMorph U-Nets), the 3D PatchGAN D, and the LT-Net training model."""
