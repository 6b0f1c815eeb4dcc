"""Models: torchvision backbones, the small CNN, and the checkpoint format."""
