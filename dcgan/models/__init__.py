"""The reference nets and their ``ModelConfig``, and the transforms of what D sees (``d_augment``), the latents generation draws (``latents``); they know nothing of a run."""
