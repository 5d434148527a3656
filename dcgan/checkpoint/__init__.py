"""What a run carries (the state), its files on disk, the resume policy, the checkpointer and loading a generator for inference."""
