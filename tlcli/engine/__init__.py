"""The engine: plans and runs a command (featurize, fit, evaluate, predict, export, inspect) on a device."""
