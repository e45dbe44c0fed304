"""How a run's process behaves: torchrun ranks, stop signals, the progress bar."""
