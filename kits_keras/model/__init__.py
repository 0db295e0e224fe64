"""The multi-scale supervised 3-D U-Net, its layers, loss and metrics."""
