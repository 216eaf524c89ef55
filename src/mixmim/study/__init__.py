"""Studies: arms x seeds -> pretraining and evaluation under one budget -> results, report, plots."""
