"""Pruning procedures: structural (AGF and baselines), IDAP++ and layer removal, Hyperflows."""
