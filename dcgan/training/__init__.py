"""The algorithm: building the training parts, the GAN step (eager or a CUDA graph), ADA, the divergence guard and the loop."""
