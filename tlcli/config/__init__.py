"""The recipe: its schema, how it is read, where its lines are, and how its stages are planned. Imports no torch."""
