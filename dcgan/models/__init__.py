"""The reference nets and their ``ModelConfig``; they know nothing of a run."""
