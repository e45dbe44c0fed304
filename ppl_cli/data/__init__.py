"""Where documents come from: the --data values -> sources -> records -> a numbered stream of documents."""
