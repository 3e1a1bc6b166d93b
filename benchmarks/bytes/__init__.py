"""Update sizes: what a client sends per round vs the size of the whole model."""
