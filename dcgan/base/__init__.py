"""Ground floor: errors, exit codes, atomic files, logs, progress and image conversions; every layer may use it."""
