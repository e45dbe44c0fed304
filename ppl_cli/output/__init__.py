"""What a run writes: scored windows -> per-document rows -> the run directory, the summary and its metrics."""
