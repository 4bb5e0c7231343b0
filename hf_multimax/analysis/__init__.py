"""Analysis tools: the max-margin toolkit (more metrics and plots land with the analysis issue)."""
