"""The commands over finished run directories: merge, compare, report and select."""
