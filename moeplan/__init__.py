"""moeplan: plan GPUs for Mixture-of-Experts models before downloading them."""

__version__ = "0.1.0"
