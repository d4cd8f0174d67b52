"""Serving-stack integrations (DeepEP/Mooncake-shaped buffer, SGLang plugin), imported lazily."""
