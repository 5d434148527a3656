"""The algorithm: building the training parts, the GAN step (eager or a CUDA graph), the divergence guard and the loop."""
