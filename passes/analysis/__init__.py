"""Built-in analysis passes; importing this package registers them."""
