"""Datasets: IDX images (MNIST, Fashion-MNIST) and TinyStories text."""
