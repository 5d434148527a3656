"""One run's processes: ranks and devices, stop signals, failures, the run lock, the run folder and its timelines."""
