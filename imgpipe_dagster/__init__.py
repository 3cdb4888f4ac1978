"""imgpipe-dagster: analyse tens of millions of image URLs with a Qwen-VL model, orchestrated by Dagster."""

__version__ = "0.1.0"
