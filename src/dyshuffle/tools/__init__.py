"""Documentation tools: ``dyshuffle table`` (parameters and MACs of every model and mixer)."""
