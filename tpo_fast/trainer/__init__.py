"""TPO trainer for Hugging Face LLaVA models."""
