"""Training data: validation rules with reasons, and a versioned, content-addressed dataset store."""
