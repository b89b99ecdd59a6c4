"""simulate: linear-reward preference data under named misspecifications."""
