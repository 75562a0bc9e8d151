"""Entry points: `python -m jobs.<name> key=value ...`, each a thin recipe over `tandem` building blocks."""
