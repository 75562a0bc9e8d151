"""Tandem building blocks shared by jobs/ and serving/: RAG for knowledge, QLoRA for behaviour, on Ray."""
