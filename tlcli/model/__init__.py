"""The model: zoos and weights, the traced graph, surgery, freezing, and the network they build."""
