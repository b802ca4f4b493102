"""The offline demo: real assets that install from package registries, and the logic only the demo needs."""
