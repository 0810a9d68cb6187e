"""winnow.models_zoo."""
